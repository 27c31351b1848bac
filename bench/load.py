"""Loading official-format checkpoints: seconds and peak memory, HF-port directory vs fairseq `.pt`.

    python bench/load.py --sizes base large --out bench/results/load.json

For each size the script writes random weights in both official layouts (HF-port safetensors
directory; fairseq `.pt` with fairseq key names and a pickled argparse config), then loads each
one in a fresh process through `ofa_unified.load_checkpoint` and reports wall seconds and the
process's peak resident memory (ru_maxrss), next to the size of the float32 weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see ofa_unified/__init__.py

import torch  # noqa: E402

from ofa_unified.checkpoint import export_hf, hf_to_fairseq  # noqa: E402
from ofa_unified.model import build_model  # noqa: E402
from ofa_unified.vocab import Vocab  # noqa: E402

PROBE = """
import json, resource, sys, time
t = time.perf_counter()
from ofa_unified.checkpoint import load_checkpoint
imported = time.perf_counter() - t
t = time.perf_counter()
loaded = load_checkpoint(sys.argv[1])
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "import_seconds": imported, "format": loaded.format,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_both(size: str, root: Path) -> tuple[Path, Path, int]:
    model = build_model(size)
    vocab = Vocab.without_text(model.config.vocab_size - 8192 - 1000 - 1, 8192, 1000)
    hf = export_hf(model, vocab, root / f"{size}-hf")
    from safetensors.torch import load_file

    state = load_file(str(hf / "model.safetensors"))
    pt = root / f"{size}.pt"
    torch.save(
        {
            "model": {hf_to_fairseq(k): v for k, v in state.items()},
            "args": argparse.Namespace(arch=f"ofa_{size}", patch_image_size=480),
        },
        pt,
    )
    return hf, pt, model.num_parameters()


def probe(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["base", "large"])
    parser.add_argument("--repeats", type=int, default=2, help="loads per file; the fastest is kept")
    parser.add_argument("--out", type=Path, default=Path("bench/results/load.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            hf, pt, params = write_both(size, Path(tmp))
            for fmt, path in (("hf", hf), ("fairseq", pt)):
                runs = [probe(path) for _ in range(args.repeats)]
                best = min(runs, key=lambda r: r["seconds"])
                row = {
                    "size": size,
                    "format": fmt,
                    "params": params,
                    "fp32_mb": params * 4 / 2**20,
                    "seconds": best["seconds"],
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            for p in (pt,):
                p.unlink()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu_threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")
    print("\n| size | format | params | fp32 weights MB | load s | peak RSS MB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']} | {r['format']} | {r['params'] / 1e6:.1f}M | {r['fp32_mb']:.0f} | "
            f"{r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
