"""`python -m serving [--checkpoint DIR] [--host H] [--port P] [--device auto|cpu|cuda] ...`: run uvicorn.

Every flag has an `OFA_SERVE_*` environment variable (see `--help`). Logs are JSON lines on stderr.
SIGTERM/SIGINT shut down gracefully: no new connections, queued requests finish, exit code 0.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
from pathlib import Path

import uvicorn

from serving.app import build_app
from serving.config import ServeConfig
from serving.telemetry import configure_logging


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    try:
        config = ServeConfig.from_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    if not Path(config.checkpoint).exists():
        logging.getLogger("serving").error(
            f"checkpoint {config.checkpoint} does not exist; pass --checkpoint DIR "
            f"or set {ServeConfig.env_name('checkpoint')}"
        )
        return 2
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler that was
    # installed before it started: make that an ordinary exit 0 instead of death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    uvicorn.run(
        build_app(config),
        host=config.host,
        port=config.port,
        log_config=None,
        log_level=config.log_level,
        access_log=False,  # the app logs each request itself, with its request id
        timeout_graceful_shutdown=math.ceil(config.shutdown_timeout_s),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
