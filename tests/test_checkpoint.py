"""Loading every checkpoint format: parity with OFA's reference, named errors, safe unpickling."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ofa_unified.checkpoint import (
    CheckpointError,
    export_hf,
    hf_to_fairseq,
    load_checkpoint,
    save_checkpoint,
)
from ofa_unified.model import build_model
from ofa_unified.vocab import Vocab


def hf_dir(reference_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "hf"
    out.mkdir()
    os.symlink(reference_dir / "weights.safetensors", out / "model.safetensors")
    shutil.copy(reference_dir / "config.json", out / "config.json")
    return out


def check_parity(model, reference_dir: Path) -> None:
    inputs = load_file(str(reference_dir / "inputs.safetensors"))
    expected = load_file(str(reference_dir / "outputs.safetensors"))
    with torch.no_grad():
        logits, enc = model(
            inputs["input_ids"], inputs["decoder_input_ids"], inputs["patch_images"], inputs["patch_masks"]
        )
    torch.testing.assert_close(enc.hidden, expected["encoder_out"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, expected["logits"], atol=1e-4, rtol=1e-4)


def test_hf_port_parity(reference_dir, tmp_path):
    loaded = load_checkpoint(hf_dir(reference_dir, tmp_path))
    assert loaded.format == "hf"
    check_parity(loaded.model, reference_dir)


def test_resnet_features_match(reference_dir, tmp_path):
    model = load_checkpoint(hf_dir(reference_dir, tmp_path)).model
    inputs = load_file(str(reference_dir / "inputs.safetensors"))
    expected = load_file(str(reference_dir / "outputs.safetensors"))["resnet_features"]
    with torch.no_grad():
        got = model.encoder.embed_images(inputs["patch_images"])
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-4)


class FakeDictConfig:
    """Pickled under omegaconf's name, like fairseq's `cfg`; omegaconf is absent when loading."""

    def __init__(self, content):
        self._content = content
        self._metadata = {"ref_type": object}

    def __getstate__(self):
        return {"_content": self._content, "_metadata": self._metadata}


def write_fairseq_pt(reference_dir: Path, path: Path) -> None:
    weights = load_file(str(reference_dir / "weights.safetensors"))
    model = {hf_to_fairseq(k): v for k, v in weights.items()}
    model["encoder.version"] = torch.tensor([3.0])
    fake = types.ModuleType("omegaconf.dictconfig")
    FakeDictConfig.__module__ = "omegaconf.dictconfig"
    FakeDictConfig.__qualname__ = "DictConfig"
    fake.DictConfig = FakeDictConfig
    parent = types.ModuleType("omegaconf")
    parent.dictconfig = fake
    sys.modules.update({"omegaconf": parent, "omegaconf.dictconfig": fake})
    try:
        args = argparse.Namespace(arch="ofa_tiny", encoder_embed_dim=256, patch_image_size=256)
        cfg = FakeDictConfig({"model": args, "task": FakeDictConfig({"patch_image_size": 256})})
        torch.save({"model": model, "cfg": cfg, "extra_state": {"epoch": 3}}, path)
    finally:
        del sys.modules["omegaconf.dictconfig"], sys.modules["omegaconf"]


def test_fairseq_pt_parity(reference_dir, tmp_path):
    pt = tmp_path / "ofa_tiny.pt"
    write_fairseq_pt(reference_dir, pt)
    assert "omegaconf" not in sys.modules
    loaded = load_checkpoint(pt)
    assert loaded.format == "fairseq"
    assert loaded.model.config.patch_image_size == 256
    assert loaded.meta["config"]["arch"] == "ofa_tiny"
    check_parity(loaded.model, reference_dir)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    pt = tmp_path / "evil.pt"
    torch.save({"model": {}, "cfg": Evil()}, pt)
    with pytest.raises(CheckpointError, match="refusing to load global"):
        load_checkpoint(pt)
    assert not marker.exists()


def test_export_hf_round_trip(reference_dir, tmp_path):
    loaded = load_checkpoint(hf_dir(reference_dir, tmp_path))
    out = export_hf(loaded.model, loaded.vocab, tmp_path / "exported")
    keys = {line.split("\t")[0] for line in (reference_dir / "keys.txt").read_text().splitlines()}
    assert set(load_file(str(out / "model.safetensors"))) == keys
    again = load_checkpoint(out)
    check_parity(again.model, reference_dir)


def tiny_vocab_and_model(tmp_path: Path):
    vocab = Vocab.without_text(60, 16, 32)
    model = build_model("micro", vocab_size=len(vocab)).eval()
    return vocab, model


def test_own_round_trip_identical_logits(tmp_path):
    vocab, model = tiny_vocab_and_model(tmp_path)
    out = save_checkpoint(model, vocab, tmp_path / "ckpt", extra={"note": "test"})
    assert sorted(p.name for p in out.iterdir()) >= ["config.json", "model.safetensors"]
    loaded = load_checkpoint(out)
    ids = torch.randint(4, 60, (2, 6))
    img = torch.randn(2, 3, 64, 64)
    dec = torch.randint(4, 60, (2, 5))
    with torch.no_grad():
        a, _ = model(ids, dec, img)
        b, _ = loaded.model(ids, dec, img)
    assert torch.equal(a, b)
    assert loaded.meta == {"note": "test"}
    assert len(loaded.vocab) == len(vocab)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    vocab, model = tiny_vocab_and_model(tmp_path)
    out = save_checkpoint(model, vocab, tmp_path / "ckpt")
    state = load_file(str(out / "model.safetensors"))
    state["encoder.layers.0.fc1.weight"] = torch.zeros(7, 64)
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.0\.fc1\.weight.*\(7, 64\).*\(128, 64\)"):
        load_checkpoint(out)


def test_missing_and_unexpected_tensors_are_listed(tmp_path):
    vocab, model = tiny_vocab_and_model(tmp_path)
    out = save_checkpoint(model, vocab, tmp_path / "ckpt")
    state = load_file(str(out / "model.safetensors"))
    del state["decoder.layer_norm.weight"]
    state["decoder.extra_head.weight"] = torch.zeros(2)
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"missing tensors \['decoder\.layer_norm\.weight'\].*"
        r"unexpected tensors \['decoder\.extra_head\.weight'\]",
    ):
        load_checkpoint(out)


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    vocab, model = tiny_vocab_and_model(tmp_path)
    out = save_checkpoint(model, vocab, tmp_path / "ckpt")
    before = (out / "model.safetensors").read_bytes()
    wrong_vocab = Vocab.without_text(10, 0, 0)
    with pytest.raises(CheckpointError, match="vocab"):
        save_checkpoint(model, wrong_vocab, out)
    assert (out / "model.safetensors").read_bytes() == before
    assert json.loads((out / "config.json").read_text())["format"] == "ofa-unified"


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(junk)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_half_precision_storage_halves_size_and_loads(tmp_path):
    vocab, model = tiny_vocab_and_model(tmp_path)
    full = save_checkpoint(model, vocab, tmp_path / "fp32")
    half = save_checkpoint(model, vocab, tmp_path / "fp16", dtype=torch.float16)
    ratio = (half / "model.safetensors").stat().st_size / (full / "model.safetensors").stat().st_size
    assert 0.45 < ratio < 0.55
    loaded = load_checkpoint(half).model
    assert next(loaded.parameters()).dtype == torch.float32
    ref = model.state_dict()["decoder.layers.0.fc1.weight"]
    torch.testing.assert_close(loaded.state_dict()["decoder.layers.0.fc1.weight"], ref, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(resnet_layers=[3, 4, 23], encoder_layers=1, decoder_layers=2, encoder_heads=8, decoder_heads=2),
        dict(d_model=96, encoder_ffn_dim=80, decoder_ffn_dim=48, vocab_size=333, encoder_layers=2),
    ],
)
def test_any_config_round_trips_through_hf_and_fairseq(tmp_path, overrides):
    """Export to the HF-port layout and to fairseq names, re-import, identical logits (non-square image)."""
    cfg = dict(
        vocab_size=500,
        d_model=64,
        encoder_layers=1,
        decoder_layers=1,
        encoder_heads=2,
        decoder_heads=2,
        encoder_ffn_dim=96,
        decoder_ffn_dim=96,
        resnet_layers=[3, 4, 6],
        resnet_width=64,
    )
    torch.manual_seed(0)
    model = build_model({**cfg, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vocab = Vocab.without_text(model.config.vocab_size - 1, 0, 0)
    ids = torch.randint(4, 300, (2, 6))
    img = torch.randn(2, 3, 96, 160)
    dec = torch.randint(4, 300, (2, 5))
    hf = export_hf(model, vocab, tmp_path / "hf")
    state = load_file(str(hf / "model.safetensors"))
    pt = tmp_path / "model.pt"
    torch.save({"model": {hf_to_fairseq(k): v for k, v in state.items()}, "args": argparse.Namespace()}, pt)
    with torch.no_grad():
        want, _ = model(ids, dec, img)
        for path in (hf, pt):
            got, _ = load_checkpoint(path).model(ids, dec, img)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_converted_reference_decodes_incrementally(reference_dir, tmp_path):
    model = load_checkpoint(hf_dir(reference_dir, tmp_path)).model
    inputs = load_file(str(reference_dir / "inputs.safetensors"))
    dec = inputs["decoder_input_ids"]
    with torch.no_grad():
        enc = model.encode(inputs["input_ids"], inputs["patch_images"], inputs["patch_masks"])
        full, _ = model.decode(dec, enc, use_cache=False)
        cache, steps = None, []
        for t in range(dec.size(1)):
            logits, cache = model.decode(dec[:, t : t + 1], enc, cache)
            steps.append(logits)
    assert (full - torch.cat(steps, dim=1)).abs().max() < 1e-4


def test_official_weights_without_tokenizer_refuse_text(reference_dir, tmp_path):
    from ofa_unified.vocab import TokenizerMissingError

    loaded = load_checkpoint(hf_dir(reference_dir, tmp_path))
    assert len(loaded.vocab) == loaded.model.config.vocab_size
    with pytest.raises(TokenizerMissingError, match="vocab.json"):
        loaded.vocab.encode(" what does the image describe?")


def test_export_refuses_options_outside_ofa(tmp_path):
    model = build_model("micro", image_skip=True, image_pos_content=True)
    vocab = Vocab.without_text(model.config.vocab_size - 1, 0, 0)
    with pytest.raises(CheckpointError, match="image_skip, image_pos_content: not part of OFA"):
        export_hf(model, vocab, tmp_path / "hf")
    lean = build_model("micro", abs_pos_bias=False, attention_scale="head_dim")
    with pytest.raises(CheckpointError, match="abs_pos_bias, attention_scale: not part of OFA"):
        export_hf(lean, vocab, tmp_path / "hf2")
    no_cross = build_model("micro", cross_pos_bias=False)
    with pytest.raises(CheckpointError, match="cross_pos_bias: not part of OFA"):
        export_hf(no_cross, vocab, tmp_path / "hf3")
