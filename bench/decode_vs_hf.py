"""This project's decoding against transformers' BART `generate` at the same dimensions.

    python bench/decode_vs_hf.py --out bench/results/decode_vs_hf_cpu.json
    python bench/decode_vs_hf.py --configs tiny/1/1 base/16/5 --repeats 3

Both sides get random weights of a named size's decoder (d_model, layers, heads, FFN, vocabulary),
a fresh random encoder output of 272 positions (256 image patches + 16 text tokens) per call and
decode only, exactly `--new-tokens` tokens (min = max, eos suppressed until then; HF with
`min_new_tokens`/`max_new_tokens`, ours with min = max, which forces the eos after them, one extra
decoder call). The two run alternately (A B A B) in one process; medians and the ratio HF / ours
are reported. Tokens/s counts every beam's tokens. OMP_WAIT_POLICY must be set before torch loads,
so compare ACTIVE and PASSIVE with two whole-process runs (`OMP_WAIT_POLICY=ACTIVE python ...`).

Also prints the memory-bandwidth ceiling for batch 1: the bytes of weights one decode step reads
(decoder layers without the cross-attention k/v projections, which run once per request, plus the
output projection) over the bandwidth a large tensor sum reaches.

More of our variants join the alternation (A B C ... per repeat, same inputs): `--quantize int8`
adds the dynamically int8-quantized model (`ofa_unified/quantize.py`; `--int8-fp32-output` also
the variant that keeps the output projection float32), `--onnx` the ONNX export on onnxruntime
(`ofa_unified/onnx_export.py`, `pip install -e '.[onnx]'`; exported once per size into a temporary
directory). Each gets its tok/s and its ratio to HF float32.

    python bench/decode_vs_hf.py --configs tiny/1/1 tiny/16/1 base/1/1 --quantize int8 --onnx \
        --out bench/results/decode_int8_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see ofa_unified/__init__.py

import torch  # noqa: E402

from ofa_unified.generate import GenerationConfig, generate  # noqa: E402
from ofa_unified.model import EncoderOutput, OFAConfig, build_model, model_config  # noqa: E402
from ofa_unified.quantize import quantize_model  # noqa: E402

IMAGE_PATCHES, TEXT_TOKENS = 256, 16
DEFAULT_CONFIGS = [f"{s}/{b}/{k}" for s in ("tiny", "base") for b in (1, 16) for k in (1, 5)]


def hf_model(cfg: OFAConfig):
    """A BART of the same decoder dimensions (its encoder is never run)."""
    from transformers import BartConfig, BartForConditionalGeneration

    hf_cfg = BartConfig(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        encoder_layers=1,
        decoder_layers=cfg.decoder_layers,
        encoder_attention_heads=cfg.decoder_heads,
        decoder_attention_heads=cfg.decoder_heads,
        encoder_ffn_dim=cfg.decoder_ffn_dim,
        decoder_ffn_dim=cfg.decoder_ffn_dim,
        max_position_embeddings=cfg.max_positions,
        forced_eos_token_id=None,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
    )
    return BartForConditionalGeneration(hf_cfg).eval()


def encoder_output(cfg: OFAConfig, batch: int, seed: int) -> EncoderOutput:
    gen = torch.Generator().manual_seed(seed)
    length = IMAGE_PATCHES + TEXT_TOKENS
    hidden = torch.randn(batch, length, cfg.d_model, generator=gen)
    pos = torch.randn(batch, length, cfg.d_model, generator=gen)
    return EncoderOutput(hidden, torch.zeros(batch, length, dtype=torch.bool), pos)


def time_ours(model, enc: EncoderOutput, beam: int, new_tokens: int) -> float:
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, beam_size=beam)
    start = time.perf_counter()
    out = generate(model, enc, config)
    elapsed = time.perf_counter() - start
    assert all(len(h.tokens) == new_tokens for hyps in out for h in hyps)
    return elapsed


def time_hf(model, enc: EncoderOutput, beam: int, new_tokens: int) -> float:
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers.modeling_outputs import BaseModelOutput

    config = HFGenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        num_beams=beam,
        do_sample=False,
        early_stopping=False,
        decoder_start_token_id=0,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    mask = torch.ones(enc.hidden.shape[:2], dtype=torch.long)
    start = time.perf_counter()
    out = model.generate(
        encoder_outputs=BaseModelOutput(last_hidden_state=enc.hidden),
        attention_mask=mask,
        generation_config=config,
    )
    elapsed = time.perf_counter() - start
    assert out.shape == (enc.hidden.size(0), new_tokens + 1), out.shape  # decoder start + new tokens
    return elapsed


def bandwidth_gb_s(repeats: int = 7) -> float:
    """Memory bandwidth a large (512 MB) tensor sum reaches, best of `repeats`."""
    big = torch.ones(128 * 2**20)
    big.sum()
    best = min(_timed(big.sum) for _ in range(repeats))
    return big.numel() * big.element_size() / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_weight_bytes(model) -> int:
    """Bytes of parameters one decode step reads: decoder layers (less the cross k/v projections,
    applied once per request) and the output projection (the tied embedding matrix)."""
    layers = sum(
        p.numel() * p.element_size()
        for name, p in model.decoder.layers.named_parameters()
        if not name.startswith(("cross_attn.k_proj", "cross_attn.v_proj"))
    )
    emb = model.decoder.embed_tokens.weight
    return layers + emb.numel() * emb.element_size()


def our_variants(model, args: argparse.Namespace) -> dict:
    """Our float32 model and the variants the flags ask for, by column name."""
    variants = {"ours": model}
    if args.quantize:
        variants["int8"] = quantize_model(model, args.quantize)
        if args.int8_fp32_output:
            variants["int8_fp32_out"] = quantize_model(model, args.quantize, output_projection=False)
    if args.onnx:
        from ofa_unified.onnx_export import OnnxModel, export_onnx

        with tempfile.TemporaryDirectory(prefix="decode_vs_hf_onnx_") as directory:
            export_onnx(model, directory)
            variants["onnx"] = OnnxModel(directory, threads=args.threads)  # sessions hold the graphs
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs", nargs="+", default=DEFAULT_CONFIGS, help="size/batch/beam, e.g. tiny/1/5"
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--repeats", type=int, default=5, help="alternating rounds (ours, its variants, HF) per configuration"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantize", choices=("int8",), help="also time the int8-quantized model")
    parser.add_argument(
        "--int8-fp32-output",
        action="store_true",
        help="with --quantize: also time int8 with the output projection left float32",
    )
    parser.add_argument("--onnx", action="store_true", help="also time the ONNX export on onnxruntime")
    parser.add_argument("--out", type=Path, default=Path("bench/results/decode_vs_hf.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows, models = [], {}
    for spec in args.configs:
        size, batch, beam = spec.split("/")
        batch, beam = int(batch), int(beam)
        if size not in models:
            models.clear()  # one size's models in memory at a time
            models[size] = (our_variants(build_model(size).eval(), args), hf_model(model_config(size)))
        ours, hf = models[size]
        cfg = ours["ours"].config
        times: dict[str, list[float]] = {name: [] for name in [*ours, "hf"]}
        with torch.inference_mode():
            for model in ours.values():  # warm-up
                time_ours(model, encoder_output(cfg, batch, 0), beam, 4)
            time_hf(hf, encoder_output(cfg, batch, 0), beam, 4)
            for r in range(args.repeats):
                for name, model in ours.items():
                    times[name].append(time_ours(model, encoder_output(cfg, batch, r), beam, args.new_tokens))
                times["hf"].append(time_hf(hf, encoder_output(cfg, batch, r), beam, args.new_tokens))
        tokens = batch * beam * args.new_tokens
        median = {name: statistics.median(t) for name, t in times.items()}
        row = {"size": size, "batch": batch, "beam": beam, "new_tokens": args.new_tokens}
        for name, seconds in median.items():
            row[f"{name}_s"] = seconds
            row[f"{name}_tok_s"] = tokens / seconds
        row["speedup"] = median["hf"] / median["ours"]
        for name in ours:
            if name != "ours":
                row[f"{name}_vs_hf"] = median["hf"] / median[name]
                row[f"{name}_vs_ours"] = median["ours"] / median[name]
        row["times"] = times
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "times"}), flush=True)

    bandwidth = bandwidth_gb_s()
    ceiling = {"bandwidth_gb_s": bandwidth}
    for size in ("tiny", "base"):
        step_bytes = step_weight_bytes(build_model(size))
        ceiling[size] = {"step_weight_mb": step_bytes / 1e6, "batch1_tok_s": bandwidth * 1e9 / step_bytes}
    from transformers import __version__ as hf_version

    result = {
        "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "transformers": hf_version,
        "load_average": os.getloadavg(),
        "ceiling": ceiling,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"\nOMP_WAIT_POLICY={result['omp_wait_policy']}, {result['threads']} threads, load {os.getloadavg()}"
    )
    extra = [k.removesuffix("_vs_hf") for k in rows[0] if k.endswith("_vs_hf")]
    head = ["size", "batch", "beam", "ours tok/s", *(f"{n} tok/s" for n in extra), "HF tok/s", "ours / HF"]
    head += [f"{n} / HF" for n in extra]
    print("\n| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for r in rows:
        cells = [r["size"], r["batch"], r["beam"], f"{r['ours_tok_s']:.0f}"]
        cells += [f"{r[f'{n}_tok_s']:.0f}" for n in extra] + [f"{r['hf_tok_s']:.0f}", f"{r['speedup']:.2f}x"]
        cells += [f"{r[f'{n}_vs_hf']:.2f}x" for n in extra]
        print("| " + " | ".join(map(str, cells)) + " |")
    print(f"\nBandwidth (512 MB tensor sum): {bandwidth:.1f} GB/s")
    for size in ("tiny", "base"):
        c = ceiling[size]
        measured = [r["ours_tok_s"] for r in rows if r["size"] == size and r["batch"] == 1 and r["beam"] == 1]
        share = f", ours at batch 1 greedy {measured[0] / c['batch1_tok_s']:.0%} of it" if measured else ""
        print(
            f"{size}: {c['step_weight_mb']:.1f} MB of weights per step -> "
            f"ceiling {c['batch1_tok_s']:.0f} tok/s at batch 1{share}"
        )


if __name__ == "__main__":
    main()
