"""VQ tokenizer: shapes, determinism, dead-code restarts, save/load, a short fit, and exact resume."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ofa_unified.vq import (
    CONFIG_NAME,
    VQConfig,
    VQTokenizer,
    block_mask,
    crop_middle,
    mask_middle,
    mask_patches,
    middle_box,
    paste_middle,
)

TINY = VQConfig(channels=8, num_res_blocks=1, patch_hidden=16, codebook_size=16, code_dim=4)
TINY_FLAGS = [
    "--channels", "4", "--num-res-blocks", "1", "--patch-hidden", "8",
    "--codebook-size", "16", "--code-dim", "4",
]  # fmt: skip


def load_script():
    path = Path(__file__).resolve().parents[1] / "train" / "vq_tokenizer.py"
    spec = importlib.util.spec_from_file_location("vq_tokenizer_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the script look their module up here
    spec.loader.exec_module(module)
    return module


def blocky_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Images of flat-coloured 8x8 blocks in [-1, 1]: structured enough to learn in a few steps."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(n, 3, size // 8, size // 8, generator=g) * 2 - 1
    return blocks.repeat_interleave(8, -1).repeat_interleave(8, -2)


def tiny_model(seed: int = 0) -> VQTokenizer:
    torch.manual_seed(seed)
    return VQTokenizer(TINY)


def test_config_downsample_and_json_round_trip():
    assert VQConfig().downsample == 8
    assert TINY.downsample == 8
    assert VQConfig.from_dict(json.loads(json.dumps(TINY.to_dict()))) == TINY
    with pytest.raises(ValueError, match="unknown VQConfig fields"):
        VQConfig.from_dict({**TINY.to_dict(), "channel_mult": [1, 2]})


def test_encode_decode_shapes_dtype_and_determinism():
    model = tiny_model().eval()
    images = blocky_images(2, 32)
    codes = model.encode(images)
    assert codes.dtype == torch.long and codes.shape == (2, 4, 4)
    assert int(codes.min()) >= 0 and int(codes.max()) < TINY.codebook_size
    assert torch.equal(codes, model.encode(images))
    recon = model.decode(codes)
    assert recon.dtype == torch.float32 and recon.shape == images.shape
    assert float(recon.min()) >= -1 and float(recon.max()) <= 1
    assert model.decode(model.encode(blocky_images(1, 64))).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="multiple of 8"):
        model.encode(torch.zeros(1, 3, 30, 30))
    with pytest.raises(ValueError, match="codes must lie"):
        model.decode(torch.full((1, 2, 2), TINY.codebook_size))


def test_encode_does_not_touch_codebook_in_train_mode():
    model = tiny_model().train()
    model(blocky_images(2))  # first training forward initialises the codebook
    before = model.quantizer.embed.clone()
    model.encode(blocky_images(2, seed=1))
    assert torch.equal(before, model.quantizer.embed)


def test_dead_code_restarts_move_unused_codes():
    cfg = VQConfig(**{**TINY.to_dict(), "dead_code_steps": 2})
    torch.manual_seed(0)
    model = VQTokenizer(cfg).train()
    images = blocky_images(4)
    model(images)  # initialises the codebook from encoder outputs; that is not a restart
    assert model.num_restarts == 0
    q = model.quantizer
    with torch.no_grad():  # park every code but 0 far away: only code 0 is ever chosen
        q.embed[1:] = 1e3
        q.ema_sum.copy_(q.embed * q.ema_count.unsqueeze(1))
        q.steps_unused.zero_()
    model(images)
    assert model.num_restarts == 0  # unused for 1 step < 2
    model(images)
    assert model.num_restarts == cfg.codebook_size - 1
    assert float(q.embed[1:].abs().max()) < 100  # moved onto encoder outputs
    with torch.no_grad():
        z = model.encoder(images).permute(0, 2, 3, 1).reshape(-1, cfg.code_dim)
    assert float(torch.cdist(q.embed[1:], z).min(1).values.max()) < 0.1
    assert model.codebook_usage(model.encode(images)) > 1 / cfg.codebook_size


def test_codebook_usage():
    model = tiny_model()
    assert model.codebook_usage(torch.tensor([[0, 1], [1, 3]])) == 3 / 16


def test_save_load_round_trip(tmp_path):
    model = tiny_model().train()
    model(blocky_images(4))
    model.eval()
    model.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"vq.safetensors", "vq_config.json"}
    loaded = VQTokenizer.load(tmp_path)
    assert loaded.config == model.config
    images = blocky_images(3, seed=2)
    assert torch.equal(model.encode(images), loaded.encode(images))
    codes = model.encode(images)
    assert torch.equal(model.decode(codes), loaded.decode(codes))
    assert loaded.num_restarts == model.num_restarts


def test_load_shape_mismatch_names_tensor_and_shapes(tmp_path):
    tiny_model().save(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["codebook_size"] = 32
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"quantizer\.embed.*\(16, 4\).*\(32, 4\)"):
        VQTokenizer.load(tmp_path)


def test_pil_helpers_round_trip_sizes():
    model = tiny_model().eval()
    images = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("L", (40, 40), 128)]
    codes = model.encode_pil(images, size=32)
    assert codes.shape == (2, 4, 4)
    out = model.decode_to_pil(codes)
    assert [im.size for im in out] == [(32, 32), (32, 32)] and out[0].mode == "RGB"


def test_middle_helpers():
    assert middle_box(128) == (32, 32, 96, 96)
    assert middle_box(256) == (64, 64, 192, 192)  # OFA's 256 px input with the centre 128 blanked
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    masked = mask_middle(x)
    assert torch.all(masked[..., 32:96, 32:96] == 0)
    assert torch.equal(masked[..., :32, :], x[..., :32, :]) and torch.equal(
        masked[..., :, 96:], x[..., :, 96:]
    )
    assert crop_middle(x).shape == (2, 3, 64, 64)
    assert torch.equal(paste_middle(masked, crop_middle(x)), x)
    assert torch.equal(paste_middle(x[0], crop_middle(x[0])), x[0])
    with pytest.raises(ValueError, match="centre"):
        paste_middle(x, torch.zeros(2, 3, 32, 32))


def test_short_training_lowers_loss():
    model = tiny_model().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    images = blocky_images(4)
    losses = []
    for _ in range(10):
        _, parts = model(images)
        optimizer.zero_grad()
        parts["loss"].backward()
        optimizer.step()
        losses.append(parts["loss"].item())
    assert losses[-1] < 0.7 * losses[0]


def test_training_script_resumes_exactly(tmp_path):
    script = load_script()
    common = [
        *TINY_FLAGS, "--steps", "8", "--batch-size", "2", "--image-size", "32", "--crop-size", "16",
        "--train-images", "6", "--val-images", "3", "--warmup", "2", "--no-progress",
    ]  # fmt: skip
    straight = script.main([*common, "--out", str(tmp_path / "a")])
    assert len(straight.losses) == 8

    first = script.main([*common, "--out", str(tmp_path / "b"), "--stop-after", "4"])
    assert first.losses == straight.losses[:4] and first.metrics is None
    assert (tmp_path / "b" / "train_state.pt").exists()
    resumed = script.main([*common, "--out", str(tmp_path / "b"), "--resume"])
    assert resumed.start_step == 4
    assert resumed.losses == straight.losses[4:]
    assert resumed.metrics == {**straight.metrics, "sec_per_step": resumed.metrics["sec_per_step"]}

    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert set(metrics) >= {"psnr", "codebook_usage"} and 0 < metrics["codebook_usage"] <= 1
    a, b = VQTokenizer.load(tmp_path / "a"), VQTokenizer.load(tmp_path / "b")
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name


@pytest.mark.parametrize("grid", [4, 8, 14])
def test_block_mask_covers_about_the_ratio_in_valid_cells(grid):
    for seed in range(20):
        masked = block_mask(grid, 0.4, random.Random(seed))
        assert masked == sorted(set(masked)) and all(0 <= i < grid * grid for i in masked)
        assert round(0.4 * grid * grid) <= len(masked) <= 0.75 * grid * grid
    assert block_mask(grid, 0.4, random.Random(1)) == block_mask(grid, 0.4, random.Random(1))
    with pytest.raises(ValueError, match="mask ratio"):
        block_mask(grid, 1.0, random.Random(0))


def test_mask_patches_blanks_exactly_the_given_cells():
    image = torch.rand(3, 32, 32) + 1  # no zeros anywhere
    out = mask_patches(image, [0, 5], grid=4)
    assert (out[:, :8, :8] == 0).all() and (out[:, 8:16, 8:16] == 0).all()
    assert int((out == 0).sum()) == 2 * 3 * 8 * 8 and (image != 0).all()  # the input is untouched
    with pytest.raises(ValueError, match="does not split"):
        mask_patches(torch.rand(3, 30, 30), [0], grid=4)


def test_encoder_codes_are_vocabulary_ids_of_the_image_code_grid():
    from ofa_unified.model import OFAConfig
    from ofa_unified.vocab import Vocab
    from ofa_unified.vq import encoder_codes

    vocab = Vocab.without_text(subword_size=40, num_codes=16, num_bins=8)
    vq = VQTokenizer(TINY).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert encoder_codes(OFAConfig(), vq, vocab, images) is None  # a model without image_tokens
    reading = OFAConfig(image_tokens=True)
    ids = encoder_codes(reading, vq, vocab, images)
    assert ids.shape == (2, 4, 4) and torch.equal(ids - vocab.code_id(0), vq.encode(images))
    assert all(vocab.is_code(int(i)) for i in ids.flatten())
    with pytest.raises(ValueError, match="needs its VQ tokenizer"):
        encoder_codes(reading, None, vocab, images)
