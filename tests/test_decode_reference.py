"""Decoding optimisations must not change a single output token: greedy, beam, sampling, constraints,
min_new_tokens, n-gram blocking, ragged prefixes and image-code rows on random small OFA models,
against outputs recorded from the decoding code before it was optimised
(`tests/data/decode_reference.json`; `python tests/test_decode_reference.py --write` re-records it).

Tokens must match exactly; scores and log-probs to float32 rounding: the decode step's output
projection multiplies by a transposed copy of the embedding (`Decoder.output_projection`), which at
batch 1 rounds differently from F.linear (a few 1e-7), and another CPU's kernels round differently
too. Every other change to the decoding loop is bit-for-bit (checked with `==` before that one)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from ofa_unified.generate import EOS, GenerationConfig, TokenRangeConstraint, TrieConstraint, generate
from ofa_unified.model import EncoderOutput, build_model

FIXTURE = Path(__file__).parent / "data" / "decode_reference.json"
MODELS = {  # micro-sized variants; each differs in a piece of the decoder's bias computation
    "ofa": {"d_model": 64, "decoder_layers": 2, "decoder_heads": 4},
    "no_cross_pos": {"d_model": 64, "decoder_layers": 2, "decoder_heads": 2, "cross_pos_bias": False},
    "no_abs_pos": {"d_model": 32, "decoder_layers": 1, "decoder_heads": 2, "abs_pos_bias": False},
}
BATCH, SOURCE, VOCAB = 4, 21, 1024


def model_of(name: str):
    torch.manual_seed(0)
    model = build_model("micro", **MODELS[name]).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial relative tables and head scales (zero / one at init)
        for module_name, p in model.named_parameters():
            if "rel_pos_table" in module_name or module_name.endswith("c_attn"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
        # A longer eos embedding (tied output row) ends some outputs early, so min_new_tokens and
        # finished beams matter; without it a random model repeats one token to max_new_tokens.
        model.decoder.embed_tokens.weight[EOS] *= 6
    return model


def encoder_output(model, code_mask: list[bool] | None) -> EncoderOutput:
    """Random encoder output of the model's width; rows 1 and 3 have padded tails."""
    gen = torch.Generator().manual_seed(2)
    d = model.config.d_model
    padding = torch.zeros(BATCH, SOURCE, dtype=torch.bool)
    padding[1, -3:] = True
    padding[3, -7:] = True
    code = None if code_mask is None else torch.tensor(code_mask)
    return EncoderOutput(
        torch.randn(BATCH, SOURCE, d, generator=gen),
        padding,
        torch.randn(BATCH, SOURCE, d, generator=gen),
        code,
    )


CANDIDATES = [[[5, 6, 7], [5, 6], [9, 10, 11, 12]], [[20, 21], [22]], [[30, 31, 32, 33, 34], [30]], [[40]]]
PREFIX = [[], [100, 101], [102], [103, 104, 105]]


def cases() -> dict[str, dict]:
    """name -> model, generate arguments (constraints as a tag, built by `constraints_of`)."""
    out: dict[str, dict] = {}
    for model in MODELS:
        for beam in (1, 5):
            kind = "greedy" if beam == 1 else f"beam{beam}"
            out[f"{model}/{kind}"] = {"model": model, "config": {"max_new_tokens": 12, "beam_size": beam}}
            out[f"{model}/{kind}/min_new"] = {
                "model": model,
                "config": {"max_new_tokens": 14, "min_new_tokens": 10, "beam_size": beam},
                "prefix": True,
            }
            out[f"{model}/{kind}/ngram2"] = {
                "model": model,
                "config": {"max_new_tokens": 16, "no_repeat_ngram_size": 2, "beam_size": beam},
            }
            out[f"{model}/{kind}/trie"] = {
                "model": model,
                "config": {"max_new_tokens": 3, "beam_size": beam, "length_penalty": 0.5},
                "constraints": "trie",
                "prefix": True,
            }
    out["ofa/beam3/range_codes_mixed"] = {
        "model": "ofa",
        "config": {"max_new_tokens": 6, "beam_size": 3},
        "constraints": "range",
        "code_mask": [True, False, True, False],
    }
    out["ofa/greedy/codes_all"] = {
        "model": "ofa",
        "config": {"max_new_tokens": 9},
        "code_mask": [True] * BATCH,
    }
    out["ofa/beam5/min_new_ngram3_lp0"] = {
        "model": "ofa",
        "config": {
            "max_new_tokens": 20,
            "min_new_tokens": 20,
            "no_repeat_ngram_size": 3,
            "beam_size": 5,
            "length_penalty": 0.0,
        },
    }
    out["ofa/sample4"] = {
        "model": "ofa",
        "config": {"max_new_tokens": 10, "beam_size": 4, "do_sample": True, "seed": 3, "top_k": 50},
    }
    out["no_cross_pos/sample_top_p"] = {
        "model": "no_cross_pos",
        "config": {"max_new_tokens": 10, "do_sample": True, "seed": 4, "top_p": 0.9, "temperature": 0.7},
    }
    return out


def constraints_of(tag: str | None):
    if tag == "trie":
        return [TrieConstraint(c) for c in CANDIDATES]
    if tag == "range":  # image rows write 5 codes, text rows any of a range or eos
        return [
            TokenRangeConstraint(600, 700, 5),
            TokenRangeConstraint(50, 90),
            TokenRangeConstraint(600, 700, 5),
            None,
        ]
    return None


def run_case(case: dict, models: dict) -> list[list[dict]]:
    model = models.setdefault(case["model"], model_of(case["model"]))
    enc = encoder_output(model, case.get("code_mask"))
    with torch.inference_mode():
        results = generate(
            model,
            enc,
            GenerationConfig(**case["config"]),
            constraints_of(case.get("constraints")),
            PREFIX if case.get("prefix") else None,
        )
    return [
        [{"tokens": h.tokens, "score": h.score, "logprobs": h.token_logprobs} for h in hyps]
        for hyps in results
    ]


@pytest.fixture(scope="module")
def models():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {}
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(cases()))
def test_decoding_reproduces_recorded_outputs(name, models):
    expected = json.loads(FIXTURE.read_text())[name]
    got = run_case(cases()[name], models)
    assert [[h["tokens"] for h in hyps] for hyps in got] == [[h["tokens"] for h in hyps] for hyps in expected]
    for hyps, want_hyps in zip(got, expected, strict=True):
        for h, want in zip(hyps, want_hyps, strict=True):
            values, want_values = [h["score"], *h["logprobs"]], [want["score"], *want["logprobs"]]
            assert values == pytest.approx(want_values, rel=1e-5, abs=1e-5)
            assert all(math.isfinite(v) for v in values)


def test_cache_growth_and_reorders_match_full_forward(models):
    """Past the preallocated capacity (33 positions after a 1-token first call) and across both kinds
    of reorder (rows of one encoder output: beams; a new encoder output: samples dropped), every
    step's logits equal a full forward over the same tokens."""
    model = models.setdefault("ofa", model_of("ofa"))
    enc = encoder_output(model, [False, True, False, False]).index_select(torch.tensor([1, 1, 2, 2]))
    tokens = torch.randint(3, VOCAB, (BATCH, 41), generator=torch.Generator().manual_seed(5))
    tokens[:, 0] = 0
    rows, cache, steps = torch.arange(BATCH), None, []
    with torch.inference_mode():
        for t in range(tokens.size(1)):
            if t == 12:  # beams trade places within their sample: the same encoder output object
                rows, cache = rows[[1, 0, 3, 2]], cache.reorder(torch.tensor([1, 0, 3, 2]))
            if t == 25:  # the first sample's rows finish: a new encoder output for the others
                keep = torch.tensor([2, 3])
                rows, cache, enc = rows[keep], cache.reorder(keep), enc.index_select(keep)
            logits, cache = model.decode(tokens[rows, t : t + 1], enc, cache)
            full, _ = model.decode(tokens[rows, : t + 1], enc, use_cache=False)
            steps.append((logits[:, 0] - full[:, -1]).abs().max().item())
    assert cache.length == tokens.size(1) and cache.self_kv[0][0].size(2) >= tokens.size(1)
    assert max(steps) < 1e-4


def write_fixture() -> None:
    torch.set_num_threads(1)
    models: dict = {}
    data = {name: run_case(case, models) for name, case in sorted(cases().items())}
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {len(data)} cases to {FIXTURE}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_decode_reference.py --write  (records the current outputs)")
    write_fixture()
