"""Evaluate a checkpoint on every task with the field's metrics; writes JSON.

    python train/evaluate.py --checkpoint checkpoints/default --out checkpoints/default/metrics.json

Data: the shapes-world split (default) or any reader spec (`--data jsonl:val.jsonl`). Every task
runs through `Predictor.predict`, the same path as the CLI and the server, with the task's own
decoding defaults (caption beam 5 / no-repeat 3, grounding exactly 4 bins, ITM and entailment
trie-constrained over their labels, shapes VQA trie-constrained over the closed answer set).
Image tasks (needs a VQ tokenizer in the checkpoint) report code accuracy and PSNR of the
generated region against the trivial mean-colour fill; text-to-image reports how often the
model's own detector finds every object the caption names in the generated image.

A model with a retrieval head (itc_dim > 0) also gets a `retrieval` entry (shapes world only):
image->text and text->image recall@1/@5 by embedding similarity over pools of 100 scenes (each
scene's first caption; chance R@1 is 0.01), averaged over the pools, and the same after re-ranking
the top `--rerank` by the fusion model's ITM.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import defaultdict
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ofa_unified import metrics
from ofa_unified.data.shapes import TASKS as SHAPES_TASKS
from ofa_unified.data.shapes import (
    VQA_ANSWERS,
    iter_samples,
    make_scene,
    record_rng,
    render_images,
    sample,
    scene_records,
)
from ofa_unified.inference import Predictor, Request
from ofa_unified.quantize import QUANTIZE_MODES
from ofa_unified.tasks import get_task, list_tasks

# The tasks the shapes world gives ground truth for, split by whether the answer is an image. The
# contrastive pairs (itc, output "embedding") decode nothing: the `retrieval` entry scores them.
IMAGE_TASKS = [t for t in SHAPES_TASKS if get_task(t).output == "codes"]
EMBEDDING_TASKS = [t for t in SHAPES_TASKS if get_task(t).output == "embedding"]
TEXT_TASKS = [t for t in SHAPES_TASKS if t not in IMAGE_TASKS + EMBEDDING_TASKS]
# Fields that hold the answer: kept out of the request so the model cannot see them.
ANSWER_FIELDS = {"captions", "answers", "label", "objects", "target_codes", "evidence"}
RETRIEVAL_POOL = 100  # scenes per retrieval pool: chance recall@1 is 1 / 100
RECALL_AT = (1, 5)


def collect(split: str, data: str | None, tasks: list[str], n: int, per_scene: int = 2) -> dict[str, list]:
    """Up to n (image, record) pairs per task, at most `per_scene` from one image for variety, drawn
    at random (seed 0) among that image's records, so every question type is asked, not only the
    ones a scene lists first (the shapes world lists colour questions before yes / no ones)."""
    if data:
        from ofa_unified.data.readers import open_dataset

        stream: Iterator = iter(open_dataset(data))
    else:
        stream = iter_samples(split, 10 * n, tasks=tasks)
    rng = random.Random(0)
    out: dict[str, list] = defaultdict(list)
    scene: dict[str, tuple[object, list]] = {}  # task -> (image id, the pairs of that image so far)

    def flush(task: str) -> None:
        _, pairs = scene.pop(task)
        for pair in rng.sample(pairs, min(per_scene, len(pairs))):
            if len(out[task]) < n:
                out[task].append(pair)

    for image, record in stream:
        task, image_id = record["task"], record.get("image_id")
        if task not in tasks or len(out[task]) >= n:
            continue
        if image_id is None:  # nothing groups the records: take each
            out[task].append((image, record))
        else:
            if task in scene and scene[task][0] != image_id:
                flush(task)
            scene.setdefault(task, (image_id, []))[1].append((image, record))
        if all(len(out[t]) >= n for t in tasks):
            break
    for task in list(scene):
        flush(task)
    return out


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> [H, W, 3] pixel values 0..255, as PSNR compares them."""
    return ((image.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).cpu().numpy()


def finite(values: list[float]) -> list[float]:
    """PSNR is infinite on an exact match; averages leave those out."""
    return [v for v in values if math.isfinite(v)]


def request_for(image: Image.Image, record: dict, closed_vqa: bool) -> Request:
    fields = {k: v for k, v in record.items() if k not in ANSWER_FIELDS and k != "task"}
    candidates = list(VQA_ANSWERS) if record["task"] == "vqa" and closed_vqa else None
    # Sampling tasks (the image outputs) draw from a fixed seed, so a report can be reproduced.
    options = {"seed": 0} if get_task(record["task"]).decoding.get("do_sample") else {}
    return Request(image, record["task"], fields, candidates=candidates, options=options)


def run_task(predictor: Predictor, task: str, pairs: list, batch_size: int, closed_vqa: bool) -> list[dict]:
    results = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        results += predictor.predict([request_for(img, rec, closed_vqa) for img, rec in chunk])
    return results


def mim_record(predictor: Predictor, image: Image.Image, record: dict, index: int) -> dict:
    """A masked-image-modeling record as the training pipeline builds it: seeded masked patches and
    the whole image's codes as truth."""
    from ofa_unified.data.pipeline import build_example, item_rng

    size = predictor.code_grid("masked_image_modeling") * predictor.vq.config.downsample
    rng = item_rng(0, index, "mim")
    return build_example(image, record, predictor.vocab, predictor.transform, rng, predictor.vq, size).record


def image_metrics(predictor: Predictor, task: str, pairs: list, results: list[dict]) -> dict[str, float]:
    """Code accuracy and PSNR for infilling; masked-code accuracy for masked image modeling;
    detector-based object recall for text-to-image."""
    from ofa_unified.vq import crop_middle

    vq = predictor.vq
    if task == "masked_image_modeling":
        parsed = [None if "parse_error" in r else r for r in results]
        return get_task(task).evaluate(parsed, [rec for _, rec in pairs])
    if task == "image_infilling":
        code_hits, psnrs, best_sample, baseline = [], [], [], []
        side = predictor.code_grid(task)
        for (image, _), res in zip(pairs, results, strict=True):
            pixels, _ = predictor.transform(image)
            middle = crop_middle(pixels)
            target = vq.encode(middle[None].to(predictor.device))[0].flatten().tolist()
            code_hits.append(metrics.code_accuracy([res.get("codes", [])], [target]))
            truth = to_uint8(middle)
            if "image" in res:
                generated, _ = predictor.transform(res["image"].resize(image.size))
                psnrs.append(metrics.psnr(to_uint8(crop_middle(generated)), truth))
                codes = torch.tensor(res["codes"], device=predictor.device).view(1, side, side)
                best_sample.append(metrics.psnr(to_uint8(vq.decode(codes)[0]), truth))
            ring = pixels.clone()
            lo, hi = pixels.shape[-1] // 4, 3 * pixels.shape[-1] // 4
            ring[:, lo:hi, lo:hi] = float("nan")
            fill = torch.nanmean(ring.flatten(1), dim=1)[:, None, None].expand_as(middle)
            baseline.append(metrics.psnr(to_uint8(fill), truth))
        return {
            "code_accuracy": float(np.mean(code_hits)),
            "psnr_middle": float(np.mean(finite(psnrs))) if psnrs else float("nan"),
            # the highest-scoring sample alone, decoded (sharp): psnr_middle with mean_image off
            "psnr_middle_best_sample": float(np.mean(finite(best_sample))) if best_sample else float("nan"),
            "psnr_mean_fill_baseline": float(np.mean(finite(baseline))),
        }
    found = []
    detections = predictor.predict([Request(r["image"], "detection") for r in results if "image" in r])
    named = [{f"{o['color']} {o['shape']}" for o in rec["objects"]} for _, rec in pairs]
    for wanted, det in zip(named, detections, strict=False):
        labels = {o["label"] for o in det.get("objects") or []}
        found.append(float(wanted <= labels))
    return {"objects_found": float(np.mean(found)) if found else 0.0, "generated": len(detections)}


def retrieval_pool(split: str, start: int, size: int) -> tuple[list[Image.Image], list[str]]:
    """Scenes start..start+size-1 of a split and each one's first caption."""
    images, captions = [], []
    for i in range(start, start + size):
        image, scene = sample(split, i)
        images.append(image)
        captions.append(scene_records(scene, record_rng(scene.seed), tasks=["caption"])[0]["captions"][0])
    return images, captions


def recalls(orders: list[list[int]], hits: list[set[int]]) -> dict[str, float]:
    """Recall@k: the share of queries with a right candidate among their first k."""
    return {
        f"r@{k}": float(np.mean([bool(set(o[:k]) & h) for o, h in zip(orders, hits, strict=True)]))
        for k in RECALL_AT
    }


def pool_retrieval(predictor: Predictor, images: list[Image.Image], captions: list[str], rerank: int) -> dict:
    """Both directions' recalls over one pool. A candidate is right when its caption is the query
    scene's (two scenes may share a first caption: either image, or either copy of it, counts)."""
    sims = predictor.embed_images(images) @ predictor.embed_texts(captions).T  # [image, text]
    right = [{j for j, c in enumerate(captions) if c == caption} for caption in captions]
    directions = {  # scores [query, candidate] and the (image, text) pair of a query and a candidate
        "image_to_text": (sims, lambda q, c: (images[q], captions[c])),
        "text_to_image": (sims.T, lambda q, c: (images[c], captions[q])),
    }
    out: dict = {}
    for direction, (scores, pair) in directions.items():
        ranked = [predictor.ranking(row.tolist()) for row in scores]
        out[direction] = recalls([[r["index"] for r in rk] for rk in ranked], right)
        if rerank:
            reranked = [predictor.rerank(rk, rerank, partial(pair, q)) for q, rk in enumerate(ranked)]
            out[f"{direction}_reranked"] = recalls([[r["index"] for r in rk] for rk in reranked], right)
    return out


def retrieval_metrics(predictor: Predictor, split: str, n: int, rerank: int) -> dict:
    """Recalls averaged over n // 100 pools of 100 scenes (one pool of n when n < 100)."""
    size = min(RETRIEVAL_POOL, n)
    pools = [
        pool_retrieval(predictor, *retrieval_pool(split, i * size, size), rerank) for i in range(n // size)
    ]
    report: dict = {"pool_size": size, "pools": len(pools), "chance_r@1": 1 / size, "rerank": rerank}
    for key in pools[0]:
        report[key] = {m: float(np.mean([p[key][m] for p in pools])) for m in pools[0][key]}
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default="checkpoints/default")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--data", help="a reader spec instead of the shapes world, e.g. jsonl:val.jsonl")
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        help=f"default: every task the checkpoint can do ({', '.join(TEXT_TASKS + IMAGE_TASKS)})",
    )
    parser.add_argument("--n", type=int, default=200, help="examples per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--open-vqa", action="store_true", help="free VQA decoding (default: closed answer set)"
    )
    parser.add_argument(
        "--rerank",
        type=int,
        default=10,
        help="retrieval: re-rank each query's top K by the fusion model's ITM (0 = off)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--quantize",
        default="none",
        choices=QUANTIZE_MODES,
        help="int8: dynamically quantized linears (CPU; what the accuracy cost is measured with)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, quantize=args.quantize)
    tasks = args.tasks or TEXT_TASKS + (IMAGE_TASKS if predictor.vq is not None else [])
    unknown = sorted(set(tasks) - set(list_tasks()))
    if unknown:
        raise SystemExit(f"unknown tasks {unknown}; known: {', '.join(list_tasks())}")
    if set(tasks) & set(EMBEDDING_TASKS):
        raise SystemExit(f"{EMBEDDING_TASKS} decode nothing: the report's `retrieval` entry scores them")
    pairs = collect(args.split, args.data, tasks, args.n)
    if "text_to_image" in tasks and not args.data:
        # The caption names the scene's objects: keep them to check the generated image against.
        pairs["text_to_image"] = [
            (img, {**rec, "objects": [vars(o) for o in make_scene(rec["image_id"]).objects]})
            for img, rec in pairs["text_to_image"]
        ]
    if "masked_image_modeling" in tasks:
        pairs["masked_image_modeling"] = [
            (img, mim_record(predictor, img, rec, i))
            for i, (img, rec) in enumerate(pairs["masked_image_modeling"])
        ]
    report: dict = {
        "checkpoint": str(args.checkpoint),
        "split": args.data or args.split,
        "quantize": args.quantize,
        "tasks": {},
    }
    if predictor.vq is not None and not args.data:
        # the bundled image tokenizer itself: reconstruction of the split's first n scenes
        images = torch.from_numpy(render_images(args.split, args.n, predictor.image_size)).permute(0, 3, 1, 2)
        report["vq_tokenizer"] = predictor.vq.reconstruction_metrics(images.to(predictor.device))
        tqdm.write(f"vq_tokenizer: {json.dumps(report['vq_tokenizer'])}")
    for task in tqdm(tasks, desc="tasks"):
        start = time.perf_counter()
        results = run_task(predictor, task, pairs[task], args.batch_size, not args.open_vqa)
        if task in IMAGE_TASKS:
            scores = image_metrics(predictor, task, pairs[task], results)
        else:
            parsed = [None if "parse_error" in r else r for r in results]
            scores = get_task(task).evaluate(parsed, [rec for _, rec in pairs[task]])
        scores["n"] = len(results)
        scores["parse_errors"] = sum("parse_error" in r for r in results)
        scores["seconds"] = round(time.perf_counter() - start, 1)
        report["tasks"][task] = scores
        tqdm.write(f"{task}: {json.dumps(scores)}")
    if predictor.has_retrieval and not args.data:
        start = time.perf_counter()
        report["retrieval"] = retrieval_metrics(predictor, args.split, args.n, args.rerank)
        report["retrieval"]["seconds"] = round(time.perf_counter() - start, 1)
        tqdm.write(f"retrieval: {json.dumps(report['retrieval'])}")
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
