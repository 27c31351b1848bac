"""CPU inference beyond float32 eager: int8 dynamic quantization (`ofa_unified/quantize.py`) and the
ONNX export run on onnxruntime (`ofa_unified/onnx_export.py`), each against the torch model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from ofa_unified.generate import GenerationConfig, generate
from ofa_unified.model import PAD_ID, build_model
from ofa_unified.quantize import QUANTIZE_MODES, check_quantize, quantize_model

IDS = torch.tensor([[0, 11, 12, 13, 14, 15, 2], [0, 20, 21, 2, PAD_ID, PAD_ID, PAD_ID]])


def peaked_micro_model():
    """A random micro model whose greedy tokens differ between prompts: weights a few times
    larger than the init's, so the logits are far from uniform and a near-tie is unlikely."""
    torch.manual_seed(0)
    model = build_model("micro").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 2 / p.size(-1) ** 0.5)
        model.decoder.embed_tokens.weight.normal_(0, 1)
    return model


def images(batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


# -- int8 ----------------------------------------------------------------------------------------


def test_int8_logits_stay_close_and_greedy_decodes():
    """Dynamic int8 rounds each weight to 1/254 of its row's range and each activation to 1/255 of
    its tensor's: errors of about 1% per matmul that add up over the ~40 matmuls of the encoder and
    decoder. Measured on this model: mean logit error 2.8% of the logits' spread (std), log-probs
    within 0.05 nats, the same argmax everywhere. The bounds (5%, 0.2 nats) leave room for other
    CPUs' kernels and stay far below what a wrong scale, a dropped bias or a stale output
    projection gives (errors of the logits' own size)."""
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=2000, patch_image_size=64).eval()
    q = quantize_model(model)
    assert q is not model and q.decoder.output_linear is not None and model.decoder.output_linear is None
    assert not any(type(m) is torch.nn.Linear for m in q.modules())  # every linear is int8
    pixels = images(2, 64)
    tokens = torch.tensor([[0, 30, 31, 32], [0, 40, 41, 42]])
    with torch.inference_mode():
        ref, _ = model.decode(tokens, model.encode(IDS, pixels))
        enc = q.encode(IDS, pixels)
        out, _ = q.decode(tokens, enc)
        assert (out - ref).abs().mean() < 0.05 * ref.std()
        assert (out.log_softmax(-1) - ref.log_softmax(-1)).abs().max() < 0.2
        assert torch.equal(out.argmax(-1), ref.argmax(-1))
        hyps = generate(q, enc, GenerationConfig(max_new_tokens=8))
    assert all(len(h[0].tokens) == 8 for h in hyps)


def test_quantize_modes_and_errors():
    model = build_model("micro")
    assert quantize_model(model, "none") is model
    assert check_quantize("int8") == "int8" and QUANTIZE_MODES == ("none", "int8")
    with pytest.raises(ValueError, match=r"quantize must be one of 'none', 'int8', got 'int4'"):
        quantize_model(model, "int4")
    model.to("meta")
    with pytest.raises(ValueError, match="CPU only"):
        quantize_model(model)


def test_predictor_and_evaluate_take_quantize(micro_checkpoint, tmp_path, capsys):
    from PIL import Image

    from ofa_unified.inference import Predictor, Request

    predictor = Predictor.from_checkpoint(micro_checkpoint, quantize="int8")
    assert predictor.quantize == "int8" and predictor.model.decoder.output_linear is not None
    result = predictor.predict(
        [Request(Image.new("RGB", (64, 64)), "caption", options={"max_new_tokens": 3})]
    )
    assert "text" in result[0]
    with pytest.raises(ValueError, match="quantize must be one of"):
        Predictor.from_checkpoint(micro_checkpoint, quantize="int4")

    script = Path(__file__).resolve().parents[1] / "train" / "evaluate.py"
    spec = importlib.util.spec_from_file_location("evaluate_int8", script)
    evaluate = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = evaluate
    spec.loader.exec_module(evaluate)
    argv = ["--checkpoint", str(micro_checkpoint), "--n", "2", "--batch-size", "2", "--tasks", "itm"]
    report = evaluate.main([*argv, "--quantize", "int8"])
    assert report["quantize"] == "int8" and report["tasks"]["itm"]["n"] == 2
    with pytest.raises(SystemExit):
        evaluate.main([*argv, "--quantize", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_serve_config_quantize():
    from serving.config import ServeConfig, resolve_device

    assert ServeConfig().quantize == "none"
    assert ServeConfig.from_env({"OFA_SERVE_QUANTIZE": "int8"}).quantize == "int8"
    with pytest.raises(ValueError, match="quantize must be one of"):
        ServeConfig(quantize="fp16")
    assert resolve_device("auto", cpu_only=True) == "cpu"


# -- ONNX ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from ofa_unified.onnx_export import OnnxModel, export_onnx

    model = peaked_micro_model()
    directory = tmp_path_factory.mktemp("onnx")
    export_onnx(model, directory)
    assert not model.training  # the export leaves the model in eval mode
    return model, OnnxModel(directory)


def test_onnx_encoder_matches_torch(onnx_pair):
    model, onnx_model = onnx_pair
    for ids in (IDS, IDS[:1, :4]):  # other batch and text lengths than the export's example
        pixels = images(len(ids), model.config.patch_image_size)
        with torch.inference_mode():
            ref = model.encode(ids, pixels, torch.ones(len(ids), dtype=torch.bool))
        out = onnx_model.encode(ids, pixels)
        assert torch.equal(out.padding_mask, ref.padding_mask)
        torch.testing.assert_close(out.hidden, ref.hidden, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.pos_embed, ref.pos_embed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("beam", [1, 3])
def test_onnx_decoding_matches_torch_tokens(onnx_pair, beam):
    """`generate` over the onnxruntime graphs writes the torch model's tokens (greedy and beam
    search, which reorders the cache), for prompts of different lengths, one of them padded."""
    model, onnx_model = onnx_pair
    pixels = images(len(IDS), model.config.patch_image_size)
    config = GenerationConfig(max_new_tokens=12, beam_size=beam)
    with torch.inference_mode():
        ref = generate(model, model.encode(IDS, pixels), config)
    out = generate(onnx_model, onnx_model.encode(IDS, pixels), config)
    assert [h[0].tokens for h in out] == [h[0].tokens for h in ref]
    assert len({tuple(h[0].tokens) for h in ref}) > 1  # the prompts do lead to different answers
    for o, r in zip(out, ref, strict=True):
        assert o[0].score == pytest.approx(r[0].score, abs=1e-4)
