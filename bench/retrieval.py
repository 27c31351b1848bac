"""Retrieval throughput: embeddings per second, and embedding retrieval against ITM on every pair.

    python bench/retrieval.py --out bench/results/retrieval_cpu.json
    python bench/retrieval.py --checkpoint DIR --device cuda --out bench/results/retrieval_h100.json

Without `--checkpoint`, a random-weight `shapes`-size model with a retrieval head (`--itc-dim`, 128)
and the bundled checkpoint's vocabulary: speed does not depend on what the weights know. Images are
shapes-world test scenes with their first captions (as `train/evaluate.py`'s retrieval pools).

Retrieving within a pool of P images and P captions, both directions, costs P + P embeddings and
one P x P product (timed whole); the fusion model's ITM has to score all P * P pairs: timed whole
up to `--itm-exact` pairs (a pool of 100), beyond that at the rate timed on `--itm-pairs` pairs
(`itm_extrapolated` says so).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see ofa_unified/__init__.py

import torch  # noqa: E402

from ofa_unified.inference import Predictor  # noqa: E402
from ofa_unified.model import build_model  # noqa: E402
from ofa_unified.vocab import Vocab  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def load_evaluate():
    """train/evaluate.py is a script, not a package module: import it from its folder."""
    if str(REPO / "train") not in sys.path:
        sys.path.insert(0, str(REPO / "train"))
    return importlib.import_module("evaluate")


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best wall seconds of `repeats` calls (a GPU is synchronised around each)."""
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def make_predictor(args: argparse.Namespace) -> Predictor:
    if args.checkpoint:
        predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device)
        if not predictor.has_retrieval:
            raise SystemExit(f"{args.checkpoint}: this model has no retrieval head (itc_dim=0)")
        return predictor
    torch.manual_seed(0)
    vocab = Vocab.load(args.vocab)
    model = build_model(args.size, vocab_size=len(vocab), itc_dim=args.itc_dim)
    return Predictor(model, vocab, device=args.device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", help="a checkpoint with a retrieval head (default: random weights)")
    parser.add_argument("--size", default="shapes", help="model size of the random-weight model")
    parser.add_argument("--itc-dim", type=int, default=128, help="its retrieval head's width")
    parser.add_argument("--vocab", default=str(REPO / "checkpoints" / "default"), help="its vocabulary")
    parser.add_argument("--n", type=int, default=256, help="images and texts embedded for the rates")
    parser.add_argument("--pools", nargs="+", type=int, default=[100, 1000])
    parser.add_argument("--itm-pairs", type=int, default=512, help="pairs the ITM rate is timed on")
    parser.add_argument(
        "--itm-exact", type=int, default=10_000, help="pools up to this many pairs: ITM timed"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="embedding batch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="write the JSON here (bench/results/retrieval_cpu.json)")
    args = parser.parse_args(argv)

    predictor = make_predictor(args)
    device = predictor.device
    evaluate = load_evaluate()
    largest = max([args.n, *args.pools])
    images, captions = evaluate.retrieval_pool("test", 0, largest)

    def embed_images(k: int) -> Callable[[], object]:
        return lambda: predictor.embed_images(images[:k], batch_size=args.batch_size)

    def embed_texts(k: int) -> Callable[[], object]:
        return lambda: predictor.embed_texts(captions[:k], batch_size=args.batch_size)

    embed_images(min(8, args.n))()  # warm-up: kernels, allocator
    rates = {
        "image_embeddings_per_s": args.n / timed(embed_images(args.n), device, args.repeats),
        "text_embeddings_per_s": args.n / timed(embed_texts(args.n), device, args.repeats),
    }
    pairs = [(images[i % largest], captions[(i * 7 + 1) % largest]) for i in range(args.itm_pairs)]
    rates["itm_pairs_per_s"] = args.itm_pairs / timed(lambda: predictor.itm_scores(pairs), device, 1)
    print(json.dumps(rates), flush=True)

    rows = []
    for pool in args.pools:

        def retrieve(pool: int = pool) -> None:
            sims = embed_images(pool)() @ embed_texts(pool)().T
            sims.topk(min(5, pool), dim=1)  # each image's best texts
            sims.topk(min(5, pool), dim=0)  # each text's best images

        embedding_s = timed(retrieve, device, args.repeats)
        all_pairs = pool * pool
        extrapolated = all_pairs > args.itm_exact
        if extrapolated:
            itm_s = all_pairs / rates["itm_pairs_per_s"]
        else:
            sample = [(im, c) for im in images[:pool] for c in captions[:pool]]
            itm_s = timed(lambda sample=sample: predictor.itm_scores(sample), device, 1)
        row = {
            "pool": pool,
            "embedding_retrieval_s": embedding_s,
            "itm_all_pairs_s": itm_s,
            "itm_extrapolated": extrapolated,
            "speedup": itm_s / embedding_s,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    result = {
        "device": name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": args.checkpoint or f"random {args.size}, itc_dim={args.itc_dim}",
        "n": args.n,
        "batch_size": args.batch_size,
        "itm_rate_pairs": args.itm_pairs,
        **rates,
        "pools": rows,
        "note": "where itm_extrapolated, itm_all_pairs_s is pool^2 / itm_pairs_per_s (rate timed on "
        "itm_rate_pairs pairs); elsewhere every pair was scored",
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| pool | embedding retrieval s | ITM every pair s | speed-up |\n|---|---|---|---|")
    for r in rows:
        itm = f"{r['itm_all_pairs_s']:.1f}" + (" (extrapolated)" if r["itm_extrapolated"] else "")
        print(f"| {r['pool']} | {r['embedding_retrieval_s']:.3f} | {itm} | {r['speedup']:.0f}x |")
    return result


if __name__ == "__main__":
    main()
