"""``wordclaw-worker``: drain the queue until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from dataclasses import replace

import anyio

from wordclaw_mcp.cli import add_process_options, configure_logging, event_loop_options, report_failure
from wordclaw_mcp.config import Settings
from wordclaw_mcp.errors import DistributionError
from wordclaw_mcp.runtime import Runtime

from .worker import Worker


async def serve(settings: Settings) -> None:
    async with Runtime.open(settings) as runtime:
        worker = Worker(runtime)
        await worker.check_secret_keys()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signal, worker)
            await worker.run()
            tg.cancel_scope.cancel()


async def _stop_on_signal(worker: Worker) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            logging.getLogger(__name__).info(
                "%s: finishing in-flight deliveries, then stopping", signal.Signals(signum).name
            )
            worker.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wordclaw-worker", description=__doc__)
    parser.add_argument("--concurrency", type=int, help="deliveries in flight at once")
    add_process_options(parser, log_level="INFO")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        settings = Settings.from_env()
        if args.concurrency is not None:
            settings = replace(settings, worker_concurrency=args.concurrency)
        anyio.run(serve, settings, backend_options=event_loop_options())
    except DistributionError as exc:
        return report_failure("wordclaw-worker", exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
