"""Load test of the HTTP server: requests/s and latency percentiles, dynamic batching on vs off.

    python bench/serve_load.py                          # checkpoints/default, 48 requests per cell
    python bench/serve_load.py -n 8 --concurrency 1 8   # a smoke run
    python bench/serve_load.py --checkpoint DIR --endpoint itm --out bench/results/serve_load.json
    python bench/serve_load.py --mix -n 96 --concurrency 32 --out bench/results/serve_continuous_cpu.json

`--mix` sends short (VQA, ITM) and long (detection, caption) requests in turn and compares continuous
batching on and off (`--no-continuous-batching`: each batch runs to its end) at the same batch size,
with latency percentiles per kind: continuous batching is for the short requests that would
otherwise wait for a long one's batch.

For each batching setting it starts `python -m serving` as a subprocess on a free 127.0.0.1 port
(loopback only), waits for /readyz, then sends `-n` requests at each concurrency level, each a
multipart upload of one shapes-world scene. Bounded: `-n` requests per cell and `--time-budget`
seconds overall (cells past the budget are reported as skipped). Writes JSON and prints a markdown
table.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
# Endpoint -> form fields of its request (the image is added to each).
ENDPOINTS = {
    "caption": {},
    "vqa": {"question": "what color is the large shape?"},
    "grounding": {"text": "the large shape"},
    "itm": {"text": "a red circle"},
    "detection": {},
}
# --mix: request i goes to MIX[i % len(MIX)]; kind of each endpoint.
MIX = ("vqa", "detection", "itm", "caption")
KIND = {"vqa": "short", "itm": "short", "grounding": "short", "detection": "long", "caption": "long"}


def scene_png() -> bytes:
    """One shapes-world scene as PNG: the bundled model's own domain."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # runnable from a checkout without `pip install -e .`
    from ofa_unified.data.shapes import sample

    image, _ = sample("test", 0)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """`python -m serving` in a subprocess; stopped with SIGTERM (graceful) on exit."""

    def __init__(
        self, args: argparse.Namespace, max_batch_size: int, log_dir: Path, continuous: bool = True
    ) -> None:
        self.port = free_port()
        self.log_path = log_dir / f"server_batch{max_batch_size}_{'cont' if continuous else 'whole'}.log"
        self.cmd = [
            sys.executable, "-m", "serving",
            "--checkpoint", str(args.checkpoint),
            "--host", HOST,
            "--port", str(self.port),
            "--device", args.device,
            "--max-batch-size", str(max_batch_size),
            "--batch-window-ms", str(args.batch_window_ms),
            "--max-queue-depth", str(max(64, 2 * max(args.concurrency))),
            "--request-timeout-s", str(args.request_timeout),
            "--log-level", "warning",
            "--continuous-batching" if continuous else "--no-continuous-batching",
        ]  # fmt: skip
        self.url = f"http://{HOST}:{self.port}"

    def __enter__(self) -> Server:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        with httpx.Client(trust_env=False, timeout=5) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited ({self.proc.returncode}); log: {self.log_path}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not ready in 300 s; log: {self.log_path}")
                try:
                    if client.get(self.url + "/readyz").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def run_cell(
    url: str, endpoints: list[str], image: bytes, n: int, concurrency: int, timeout: float
) -> dict:
    """n requests (request i to endpoints[i % len]), at most `concurrency` in flight; latency per
    request and overall throughput, and per kind (`KIND`) when the endpoints are a mix."""
    latencies: dict[str, list[float]] = {}
    statuses: dict[str, int] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            endpoint = endpoints[queue.get_nowait() % len(endpoints)]
            files = {"image": ("scene.png", image, "image/png")}
            start = time.perf_counter()
            try:
                r = await client.post(f"/v1/{endpoint}", files=files, data=ENDPOINTS[endpoint])
                key = str(r.status_code)
            except httpx.HTTPError as e:
                key = type(e).__name__
            latencies.setdefault(KIND[endpoint], []).append(time.perf_counter() - start)
            statuses[key] = statuses.get(key, 0) + 1

    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    out = {
        "requests": n,
        "ok": statuses.get("200", 0),
        "statuses": statuses,
        "seconds": round(seconds, 3),
        "rps": round(n / seconds, 2),
        **percentiles([t for ts in latencies.values() for t in ts]),
    }
    if len(latencies) > 1:
        out["by_kind"] = {
            kind: {"requests": len(ts), **percentiles(ts)} for kind, ts in sorted(latencies.items())
        }
    return out


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 1) for q in (50, 95, 99)}


def mix_markdown(results: list[dict]) -> str:
    rows = [
        "| continuous batching | max batch | concurrency | ok/requests | req/s | short p50 ms | short p99 ms "
        "| long p50 ms | long p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        head = f"| {r['continuous_batching']} | {r['max_batch_size']} | {r['concurrency']}"
        if r.get("skipped"):
            rows.append(head + " | skipped (time budget) | | | | | |")
            continue
        short, long = r["by_kind"]["short"], r["by_kind"]["long"]
        rows.append(
            f"{head} | {r['ok']}/{r['requests']} | {r['rps']} | {short['p50_ms']} | {short['p99_ms']} "
            f"| {long['p50_ms']} | {long['p99_ms']} |"
        )
    return "\n".join(rows)


def markdown(results: list[dict]) -> str:
    rows = [
        "| batching | max batch | concurrency | ok/requests | req/s | p50 ms | p95 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if r.get("skipped"):
            cell = f"| {r['batching']} | {r['max_batch_size']} | {r['concurrency']}"
            rows.append(cell + " | skipped (time budget) | | | | |")
            continue
        rows.append(
            f"| {r['batching']} | {r['max_batch_size']} | {r['concurrency']} | {r['ok']}/{r['requests']} "
            f"| {r['rps']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / "default")
    ap.add_argument(
        "-n", "--requests", type=int, default=48, help="requests per (batching, concurrency) cell"
    )
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-batch-size", type=int, default=8, help="batch size limit when batching is on")
    ap.add_argument("--batch-window-ms", type=float, default=5.0)
    ap.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="caption")
    ap.add_argument(
        "--mix",
        action="store_true",
        help=f"send {', '.join(MIX)} in turn; compare continuous batching on and off (not batching on/off)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--request-timeout", type=float, default=120.0, help="seconds, client and server")
    ap.add_argument("--time-budget", type=float, default=300.0, help="seconds for the whole run")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve_load.json")
    args = ap.parse_args(argv)
    if not args.checkpoint.exists():
        ap.error(f"checkpoint {args.checkpoint} does not exist (train it, or pass --checkpoint DIR)")
    if args.requests < 1 or min(args.concurrency) < 1:
        ap.error("--requests and --concurrency must be >= 1")

    image = scene_png()
    start = time.monotonic()
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        if args.mix:  # (cell labels, max batch size, continuous batching) per server
            servers = [({"continuous_batching": on}, args.max_batch_size, on == "on") for on in ("on", "off")]
        else:
            servers = [({"batching": "on"}, args.max_batch_size, True), ({"batching": "off"}, 1, True)]
        endpoints = list(MIX) if args.mix else [args.endpoint]
        for labels, max_batch, continuous in servers:
            cells = [{**labels, "max_batch_size": max_batch, "concurrency": c} for c in args.concurrency]
            if time.monotonic() - start > args.time_budget:
                results += [{**cell, "skipped": True} for cell in cells]
                continue
            with Server(args, max_batch, Path(tmp), continuous) as server:
                for cell in cells:
                    if time.monotonic() - start > args.time_budget:
                        results.append({**cell, "skipped": True})
                        continue
                    load = _load()
                    stats = asyncio.run(
                        run_cell(
                            server.url,
                            endpoints,
                            image,
                            args.requests,
                            cell["concurrency"],
                            args.request_timeout,
                        )
                    )
                    results.append({**cell, **stats, "load_before": load, "load_after": _load()})
                    print(f"{labels} c={cell['concurrency']}: {stats['rps']} req/s", file=sys.stderr)

    report = {
        "benchmark": "serve_load",
        "endpoints": [f"/v1/{e}" for e in endpoints],
        "checkpoint": str(args.checkpoint),
        "device": args.device,
        "requests_per_cell": args.requests,
        "batch_window_ms": args.batch_window_ms,
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": _cpus()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(mix_markdown(results) if args.mix else markdown(results))
    return 0


def _load() -> list[float] | None:
    """The 1/5/15-minute load averages (`uptime`): other work on the machine skews a run."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _cpus() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    sys.exit(main())
