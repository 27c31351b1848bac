"""Image-infilling decoding sweep: PSNR of the middle for greedy decoding and for the pixel mean of
N samples (`mean_image`) at several top-k, on the val split (the test split stays for the report).

    python bench/infill_decoding.py --checkpoint checkpoints/default --n 100 --out bench/results/x.json

Why: PSNR rewards the least-squares guess. Where the model is unsure (an object hidden under the
mask), one sharp sample is often wrong, while the mean of several samples hedges, as the mean-colour
baseline does. This picks the decoding defaults in instructions/templates.json. Two ceilings come
first: the tokenizer's (the true middle's codes, decoded) and a perfect sharp background (the scene
drawn without its objects: what a model that continues the background exactly, and draws nothing
it cannot see, would score).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ofa_unified import metrics
from ofa_unified.data.shapes import make_scene, render
from ofa_unified.inference import Predictor
from ofa_unified.vq import crop_middle

TRAIN = Path(__file__).resolve().parents[1] / "train"


def load_evaluate():
    """train/evaluate.py is a script, not a package module: import it from its folder."""
    if str(TRAIN) not in sys.path:
        sys.path.insert(0, str(TRAIN))
    return importlib.import_module("evaluate")


def settings(samples: list[int], top_ks: list[int], temperatures: list[float]) -> list[dict]:
    greedy = {"do_sample": False, "beam_size": 1, "mean_image": False}
    sampled = [
        {"do_sample": True, "beam_size": n, "top_k": k, "top_p": 1.0, "temperature": t, "mean_image": n > 1}
        for t in temperatures
        for k in top_ks
        for n in samples
    ]
    return [greedy, *sampled]


def ceilings(evaluate, predictor: Predictor, pairs: list) -> dict[str, float]:
    """Middle PSNR of the tokenizer's reconstruction and of the scene's bare background."""
    to_uint8 = evaluate.to_uint8
    tokenizer, background = [], []
    for image, record in pairs:
        truth = crop_middle(predictor.transform(image)[0])
        decoded = predictor.vq.decode(predictor.vq.encode(truth[None].to(predictor.device)))[0]
        tokenizer.append(metrics.psnr(to_uint8(decoded), to_uint8(truth)))
        scene = make_scene(record["image_id"], image.width)
        bare = render(dataclasses.replace(scene, objects=[]))
        background.append(metrics.psnr(to_uint8(crop_middle(predictor.transform(bare)[0])), to_uint8(truth)))
    mean = lambda xs: float(np.mean(evaluate.finite(xs)))
    return {"psnr_tokenizer_ceiling": mean(tokenizer), "psnr_true_background": mean(background)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default="checkpoints/default")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"))
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument(
        "--top-k", type=int, nargs="+", default=[2, 3, 5, 0], help="0 = the full distribution"
    )
    parser.add_argument("--temperature", type=float, nargs="+", default=[1.0])
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    evaluate = load_evaluate()
    predictor = Predictor.from_checkpoint(args.checkpoint)
    if predictor.vq is None:
        raise SystemExit(f"{args.checkpoint} has no VQ tokenizer: it cannot infill images")
    pairs = evaluate.collect(args.split, None, ["image_infilling"], args.n)["image_infilling"]
    with torch.inference_mode():
        bounds = ceilings(evaluate, predictor, pairs)
    print(json.dumps(bounds), flush=True)
    rows = []
    for options in settings(args.samples, args.top_k, args.temperature):
        start = time.perf_counter()
        results = []
        for i in range(0, len(pairs), args.batch_size):
            chunk = pairs[i : i + args.batch_size]
            requests = [evaluate.request_for(img, rec, closed_vqa=True) for img, rec in chunk]
            requests = [dataclasses.replace(r, options={**options, "seed": 0}) for r in requests]
            results += predictor.predict(requests)
        scores = evaluate.image_metrics(predictor, "image_infilling", pairs, results)
        row = {**options, **scores, "seconds": round(time.perf_counter() - start, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "checkpoint": str(args.checkpoint),
        "split": args.split,
        "n": len(pairs),
        **bounds,
        "rows": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
