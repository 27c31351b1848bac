"""Training throughput of the real recipe: samples/s, tokens/s and peak memory per model size.

    python bench/train_throughput.py --models shapes base --steps 40 --out bench/results/train_cpu.json

Runs `train/multitask.py` (default task mix, shapes world, no evaluation) in a fresh process per
model for `--steps` steps and reads its `metrics.jsonl`; the first `--skip` logged windows (warm-up,
first batches) are left out of the average. Peak memory is the training process's own ru_maxrss
(host memory; GPU memory is not tracked here).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Runs the recipe as __main__ and then reports this process's own peak memory on the last line.
WRAP = """
import json, resource, runpy, sys
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(model: str, steps: int, batch: int, device: str, skip: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable,
            "-c",
            WRAP,
            str(REPO / "train" / "multitask.py"),
            "--model",
            model,
            "--out",
            out,
            "--max-steps",
            str(steps),
            "--batch-size",
            str(batch),
            "--device",
            device,
            "--vq",
            "none",
            "--eval-interval",
            "0",
            "--eval-samples",
            "0",
            "--eval-generate",
            "0",
            "--log-interval",
            "5",
            "--save-interval",
            str(10 * steps),
            "--no-progress",
            "--vocab-scenes",
            "200",
            "--num-workers",
            str(workers),
        ]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        peak = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        lines = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    windows = [x for x in lines if "samples_per_s" in x][skip:]
    if not windows:
        raise SystemExit(f"{model}: too few logged windows; raise --steps")
    mean = lambda k: sum(w[k] for w in windows) / len(windows)
    return {
        "model": model,
        "batch": batch,
        "steps": steps,
        "device": device,
        "workers": workers,
        "samples_per_s": mean("samples_per_s"),
        "tokens_per_s": mean("tokens_per_s"),
        "peak_rss_mb": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["shapes", "base"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--skip", type=int, default=1, help="logged windows (of 5 steps) to leave out")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--num-workers", type=int, default=1, help="data worker processes (scene rendering sets the pace)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/train_throughput.json"))
    args = parser.parse_args()
    rows = []
    for model in args.models:
        rows.append(run(model, args.steps, args.batch_size, args.device, args.skip, args.num_workers))
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(
        "\n| model | device | batch | workers | samples/s | tokens/s | peak RSS MB |\n"
        "|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['model']} | {r['device']} | {r['batch']} | {r['workers']} | {r['samples_per_s']:.1f} | "
            f"{r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
