"""Training-sample throughput of the shapes-world pipeline on one core: render, records, preprocess.

    python bench/data_pipeline.py --n 600 --out bench/results/data_pipeline_cpu.json

Builds `ShapesMultitask` items (scene rendering, the drawn task's record, image transform,
tokenization) in this process with one torch thread: what one DataLoader worker delivers. On a
GPU machine the workers, not the model, set the training pace (bench/README.md), so samples/s per
core times workers is the ceiling of a run. `--vq DIR` adds the image-output tasks and their VQ
targets, encoded on the CPU as the workers do.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see ofa_unified/__init__.py

import torch  # noqa: E402

from ofa_unified.data.pipeline import IMAGE_OUTPUT_TASKS, ShapesMultitask  # noqa: E402
from ofa_unified.vocab import Vocab  # noqa: E402
from ofa_unified.vq import VQTokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# the default training mix (train/configs/shapes.py), here without importing the recipe
MIX = {"detection": 3.0, "grounding": 2.5, "caption": 2.0, "vqa": 2.0, "grounded_caption": 1.0, "itm": 1.0}
MIX |= {"visual_entailment": 1.0, "text_infilling": 0.5, "image_infilling": 0.5, "text_to_image": 0.5}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=600, help="samples to time (after 20 warm-up ones)")
    parser.add_argument(
        "--checkpoint", type=Path, default=REPO / "checkpoints" / "default", help="its vocabulary"
    )
    parser.add_argument("--vq", type=Path, help="a VQ tokenizer dir: include the image-output tasks")
    parser.add_argument("--out", type=Path, default=Path("bench/results/data_pipeline.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    vocab = Vocab.load(args.checkpoint)
    vq = VQTokenizer.load(args.vq) if args.vq else None
    tasks = {k: w for k, w in MIX.items() if vq is not None or k not in IMAGE_OUTPUT_TASKS}
    data = ShapesMultitask("train", tasks, vocab, 128, vq=vq, code_image_size=64)
    for i in range(20):
        data[i]
    start = time.perf_counter()
    for i in range(20, 20 + args.n):
        data[i]
    seconds = time.perf_counter() - start
    row = {
        "samples": args.n,
        "image_tasks": vq is not None,
        "samples_per_s_per_core": round(args.n / seconds, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
