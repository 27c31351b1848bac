"""Decoding throughput: generated tokens per second, KV cache against recomputing the prefix.

    python bench/decode.py --sizes tiny base --out bench/results/decode_cpu.json

Random-weight models of the named sizes; every run generates exactly `--new-tokens` tokens per
sequence (min = max), so the cache and recompute paths do the same work apart from the cache.
"Recompute" runs the same generate loop but re-decodes the whole prefix at every step, which is
what decoding without a cache costs. Tokens/s counts generated tokens of every beam
(batch x beams x new tokens) per second of decoding; the encoder pass is excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see ofa_unified/__init__.py

import torch  # noqa: E402

from ofa_unified.generate import GenerationConfig, generate  # noqa: E402
from ofa_unified.model import build_model  # noqa: E402


class RecomputeCache:
    """Stands in for KVCache: keeps only the tokens, so every step decodes the full prefix."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    @property
    def length(self) -> int:
        return self.tokens.size(1)

    def reorder(self, idx: torch.Tensor) -> RecomputeCache:
        self.tokens = self.tokens.index_select(0, idx)
        return self


class Recompute:
    """A model wrapper whose decode ignores caching and recomputes all positions."""

    def __init__(self, model):
        self.model = model

    def decode(self, tokens, enc, cache=None, use_cache=True):
        full = tokens if cache is None else torch.cat([cache.tokens, tokens], dim=1)
        logits, _ = self.model.decode(full, enc, None, use_cache=False)
        return logits[:, -tokens.size(1) :], RecomputeCache(full)


def run(model, enc, beam: int, new_tokens: int, cached: bool, repeats: int) -> float:
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, beam_size=beam)
    runner = model if cached else Recompute(model)
    best = float("inf")
    for _ in range(repeats):
        if enc.hidden.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        generate(runner, enc, config)
        if enc.hidden.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return enc.hidden.size(0) * beam * new_tokens / best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--beams", nargs="+", type=int, default=[1, 5])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-recompute", action="store_true", help="skip the (slow) recompute baseline")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results/decode.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    rows = []
    for size in args.sizes:
        model = build_model(size).to(args.device).eval()
        for batch in args.batches:
            ids = torch.randint(4, 50000, (batch, 12), device=args.device)
            images = torch.randn(batch, 3, args.image_size, args.image_size, device=args.device)
            with torch.inference_mode():
                enc = model.encode(ids, images)
                for beam in args.beams:
                    row = {"size": size, "batch": batch, "beam": beam, "new_tokens": args.new_tokens}
                    row["cached_tok_s"] = run(model, enc, beam, args.new_tokens, True, args.repeats)
                    if not args.no_recompute:
                        row["recompute_tok_s"] = run(model, enc, beam, args.new_tokens, False, 1)
                        row["speedup"] = row["cached_tok_s"] / row["recompute_tok_s"]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        del model
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    result = {"device": device, "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| size | batch | beam | cached tok/s | recompute tok/s | speedup |\n|---|---|---|---|---|---|")
    for r in rows:
        rec = f"{r['recompute_tok_s']:.0f} | {r['speedup']:.1f}x" if "speedup" in r else "- | -"
        print(f"| {r['size']} | {r['batch']} | {r['beam']} | {r['cached_tok_s']:.0f} | {rec} |")


if __name__ == "__main__":
    main()
