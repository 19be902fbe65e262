"""Store throughput: record_tokens calls per second, as the token-created worker makes them.

    python -m tests.bench.store_bench --database-url postgresql+asyncpg://postgres:postgres@127.0.0.1:5432/bench \
        --count 5000 --concurrency 64

The database must exist; the schema is migrated. Every run uses fresh tokens. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

from cryptography.fernet import Fernet

from authnotify.config import TokenKeys
from authnotify.domain.authorizations import TokenGrant
from authnotify.store import SqlStore as Store


async def bench(database_url: str, count: int, concurrency: int, duplicates: float) -> None:
    store = await Store.connect(database_url, TokenKeys([Fernet.generate_key().decode()]))
    expiry = datetime.now(UTC) + timedelta(days=30)
    grants = [
        TokenGrant(provider="aps", access_token=f"AT-{uuid.uuid4().hex}", refresh_token=f"RT-{uuid.uuid4().hex}",
                   access_token_expiry_time=expiry, refresh_token_expiry_time=expiry, auth_client_id="C1",
                   reference_merchant_id="M1", reference_agreement_id=uuid.uuid4().hex[:16], scopes=["AGREEMENT_PAY"])
        for _ in range(count)
    ]
    # A share of redeliveries exercises the known-authorization path too.
    grants += grants[: int(count * duplicates)]
    queue: asyncio.Queue[TokenGrant] = asyncio.Queue()
    for grant in grants:
        queue.put_nowait(grant)
    events = 0

    async def worker() -> None:
        nonlocal events
        while not queue.empty():
            recorded = await store.record_tokens(queue.get_nowait())
            events += len(recorded.events)

    started, cpu_started = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    await store.close()
    print(f"{len(grants)} record_tokens in {elapsed:.2f}s: {len(grants) / elapsed:.0f}/s "
          f"({events} activations, concurrency {concurrency}; {cpu * 1000 / len(grants):.2f} ms CPU per call, "
          f"so {len(grants) / cpu:.0f}/s if the database kept up)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default="sqlite+aiosqlite:///bench.db")
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duplicates", type=float, default=0.1, help="share of calls that repeat a grant")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(bench(args.database_url, args.count, args.concurrency, args.duplicates))
    except ImportError:  # pragma: no cover
        asyncio.run(bench(args.database_url, args.count, args.concurrency, args.duplicates))


if __name__ == "__main__":
    main()
