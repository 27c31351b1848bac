"""A real `python -m serving` process (uvicorn) on a free loopback port: ready, answers, logs JSON with
the request id, and exits cleanly on SIGTERM."""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from PIL import Image

from tests.test_serving import build_micro_checkpoint

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(checkpoint: Path, log_path: Path, *flags: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m serving` on a free loopback port, yielded (base URL, process) once /readyz says
    ready; killed on the way out if still running."""
    port = free_port()
    cmd = [sys.executable, "-m", "serving", "--checkpoint", str(checkpoint), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--device", "cpu", *flags]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, trust_env=False, timeout=30) as client:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "server not ready in 60 s:\n" + log_path.read_text()
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_python_m_serving_answers_and_exits_cleanly(tmp_path: Path) -> None:
    checkpoint = build_micro_checkpoint(tmp_path, with_vq=False)
    log_path = tmp_path / "server.log"
    with (
        server_process(checkpoint, log_path, "--max-batch-size", "4") as (base, proc),
        httpx.Client(base_url=base, trust_env=False, timeout=30) as client,
    ):
        buf = io.BytesIO()
        Image.new("RGB", (80, 50), (200, 30, 30)).save(buf, "PNG")
        r = client.post(
            "/v1/itm",
            files={"image": ("red.png", buf.getvalue(), "image/png")},
            data={"text": "a red square"},
            headers={"X-Request-ID": "process-test-1"},
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-request-id"] == "process-test-1"
        assert r.json()["answer"] in ("yes", "no") and r.json()["image_size"] == [80, 50]
        assert "ofa_batch_size_bucket" in client.get("/metrics").text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log_path.read_text()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert any(line.get("request_id") == "process-test-1" and line.get("status") == 200 for line in lines)
    assert any(line["message"] == "ready" for line in lines)
