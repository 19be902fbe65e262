"""The merchant circuit (docs/events.md): a merchant whose endpoint keeps failing stops taking worker slots.

After ``AUTHNOTIFY_MERCHANT_CIRCUIT_FAILURES`` (default 5; 0 turns it off) consecutive failed deliveries to one
registry entry, that entry's circuit opens: its events are not attempted but fail at once, as a transient
failure saying so, so they keep their place in the retry schedule (and, at its end, go to the dead-letter
queue) without holding a consumer slot for a 15-second timeout each, and every other merchant's events flow
at full speed. While it is open, one delivery at a time is let through as a probe, at most one per probe
interval (the shortest ``merchant-events`` retry delay); a probe that fails keeps it open for another
interval, and any successful delivery closes it.

The state is each worker process's own (no broker or database round trip per delivery): every replica opens
after its own N failures and closes on its own first success.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from authnotify.errors import TransientError
from authnotify.observability.logging import get_logger
from authnotify.observability.metrics import MERCHANT_CIRCUIT_OPEN

log = get_logger("authnotify.merchant_events")

DEFAULT_PROBE_INTERVAL_SECONDS = 5.0


class CircuitOpen(TransientError):
    """The merchant's circuit is open: the event was not attempted and waits for its next retry."""


@dataclass
class _Circuit:
    failures: int = 0  # consecutive failed deliveries
    last_failure: str = ""
    open_since: float | None = None  # None: closed
    probe_after: float = 0.0
    probing: bool = False


class MerchantCircuits:
    """One circuit per registry entry (a bounded set of names), for this worker process."""

    def __init__(self, failures_to_open: int, probe_interval: float = DEFAULT_PROBE_INTERVAL_SECONDS, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failures_to_open = failures_to_open
        self.probe_interval = probe_interval
        self._clock = clock
        self._circuits: dict[str, _Circuit] = {}

    def is_open(self, merchant: str) -> bool:
        circuit = self._circuits.get(merchant)
        return circuit is not None and circuit.open_since is not None

    @contextmanager
    def attempt(self, merchant: str) -> Iterator[None]:
        """Around one delivery to ``merchant``: raises :class:`CircuitOpen` instead of letting it through while
        the circuit is open (but for a probe); a :class:`TransientError` out of the block counts as a failed
        delivery, a normal exit as a success. Anything else (a cancelled delivery) counts as neither."""
        circuit = self._circuits.setdefault(merchant, _Circuit())
        probe = False
        if circuit.open_since is not None:
            if circuit.probing or self._clock() < circuit.probe_after:
                raise CircuitOpen(
                    f"merchant {merchant!r} not attempted: its circuit is open after {circuit.failures} consecutive "
                    f"failed deliveries (last: {circuit.last_failure})")
            circuit.probing = probe = True
        try:
            yield
        except TransientError as exc:
            self._failed(merchant, circuit, str(exc) or type(exc).__name__)
            raise
        else:
            self._succeeded(merchant, circuit)
        finally:
            if probe:
                circuit.probing = False

    def _failed(self, merchant: str, circuit: _Circuit, reason: str) -> None:
        circuit.failures += 1
        circuit.last_failure = reason
        if circuit.open_since is not None:
            circuit.probe_after = self._clock() + self.probe_interval
        elif self.failures_to_open and circuit.failures >= self.failures_to_open:
            circuit.open_since = self._clock()
            circuit.probe_after = circuit.open_since + self.probe_interval
            MERCHANT_CIRCUIT_OPEN.labels(merchant).set(1)
            log.warning("merchant_circuit_opened", merchant=merchant, failures=circuit.failures, reason=reason,
                        probe_interval_seconds=self.probe_interval)

    def _succeeded(self, merchant: str, circuit: _Circuit) -> None:
        if circuit.open_since is not None:
            MERCHANT_CIRCUIT_OPEN.labels(merchant).set(0)
            log.info("merchant_circuit_closed", merchant=merchant, failures=circuit.failures,
                     open_seconds=round(self._clock() - circuit.open_since, 3))
        circuit.failures = 0
        circuit.open_since = None
