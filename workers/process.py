"""``authnotify worker [NAME ...]``: the named consumers in one process, until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import importlib
import signal
from collections.abc import Sequence

from authnotify.config.settings import Settings
from authnotify.observability.logging import get_logger
from authnotify.messaging.topology import Consumer
from authnotify.workers.resources import Resources
from authnotify.messaging.consumer import WorkerRuntime, WorkerSpec

log = get_logger("authnotify.worker")


def handler_module(name: str) -> str:
    """authcode-created -> authnotify.workers.authcode_created"""
    return f"authnotify.workers.{Consumer(name).value.replace('-', '_')}"


async def build_specs(resources: Resources, names: Sequence[str]) -> list[WorkerSpec]:
    specs: list[WorkerSpec] = []
    for name in dict.fromkeys(names):  # a name given twice runs once
        module = importlib.import_module(handler_module(name))
        specs.append(await module.worker_spec(resources))
    return specs


async def run_workers(settings: Settings, names: list[str]) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    resources = Resources(settings)
    try:
        specs = await build_specs(resources, names)
        runtime = WorkerRuntime(settings, specs)
        await runtime.start()
        log.info("worker_started", consumers=[spec.consumer.value for spec in specs])
        stopped = asyncio.ensure_future(stop.wait())
        failed = asyncio.ensure_future(runtime.wait_failed())
        await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        failed.cancel()
        log.info("worker_stopping")
        await runtime.stop()
        if runtime.failure is not None:
            from authnotify.cli.main import CommandError

            raise CommandError(f"authnotify: worker could not start consuming ({type(runtime.failure).__name__}: "
                               f"{str(runtime.failure).splitlines()[0][:200] if str(runtime.failure) else ''})")
    finally:
        await resources.aclose()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0
