"""`python -m serving [--checkpoint DIR] [--host H] [--port P] [--device auto|cpu|cuda] ...`: run uvicorn.

`--demo IMAGE` also sends sample requests about IMAGE once the model is ready and prints the answers.

Every flag has an `OFA_SERVE_*` environment variable (see `--help`). Logs are JSON lines on stderr.
SIGTERM/SIGINT shut down gracefully: no new connections, queued requests finish, exit code 0.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from serving.app import build_app
from serving.config import ServeConfig
from serving.telemetry import configure_logging


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def demo(base: str, image: Path) -> None:
    """Once the server is ready, ask it about `image` over HTTP and print the answers with the curl lines."""
    for _ in range(600):
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    asks = [("caption", {}), ("vqa", {"question": "how many shapes are there?"}), ("detection", {})]
    for endpoint, fields in asks:
        form = " ".join(f"-F '{k}={v}'" for k, v in fields.items())
        print(f"$ curl -s -F image=@{image} {form} {base}/v1/{endpoint}".replace("  ", " "), flush=True)
        with open(image, "rb") as f:
            reply = httpx.post(f"{base}/v1/{endpoint}", files={"image": f}, data=fields, timeout=120)
        body = reply.json()
        body.pop("tokens", None)
        print(json.dumps(body), flush=True)
    print(f"serving on {base} (Ctrl-C to stop)", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    demo_image = None
    if "--demo" in argv:
        at = argv.index("--demo")
        if at + 1 >= len(argv):
            print("error: --demo needs an image path", file=sys.stderr)
            return 2
        demo_image = Path(argv[at + 1])
        del argv[at : at + 2]
        if not demo_image.is_file():
            print(f"error: --demo image {demo_image} does not exist", file=sys.stderr)
            return 2
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
    if demo_image is not None:
        base = f"http://{config.host}:{config.port}"
        threading.Thread(target=demo, args=(base, demo_image), daemon=True).start()
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
