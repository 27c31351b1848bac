"""The model itself: every named size builds, trains (all parameters get gradients), and
incremental decoding over the KV cache equals a full forward pass."""

from __future__ import annotations

import pytest
import torch

from ofa_unified.generate import GenerationConfig, generate
from ofa_unified.model import OFAConfig, build_model, list_models, model_config


def randomized(model):
    """Non-trivial weights: zero-initialised relative tables and unit c_attn would hide bugs."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_scale = p.dim() == 1 and (name.endswith("weight") or name.endswith("c_attn"))
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if is_scale else 0.0))
    return model.eval()


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return randomized(build_model("micro"))


def inputs(batch=3, src=7, image=64, pad_last=True):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 1000, (batch, src), generator=gen)
    if pad_last:
        ids[-1, src - 2 :] = 1
    return ids, torch.randn(batch, 3, image, image, generator=gen)


@pytest.mark.parametrize("code_mask", [None, [True, False, True], [True, True, True]])
def test_kv_cache_matches_full_forward(micro, code_mask):
    ids, img = inputs()
    code = torch.tensor(code_mask) if code_mask is not None else None
    enc = micro.encode(ids, img, code_mask=code)
    dec = torch.randint(4, 1000, (3, 9), generator=torch.Generator().manual_seed(2))
    dec[:, 0] = 0
    with torch.no_grad():
        full, _ = micro.decode(dec, enc, use_cache=False)
        cache, steps = None, []
        for t in range(dec.size(1)):
            logits, cache = micro.decode(dec[:, t : t + 1], enc, cache)
            steps.append(logits)
    assert (full - torch.cat(steps, dim=1)).abs().max() < 1e-4
    assert full.abs().max() > 1.0  # the comparison is on non-trivial logits


def test_beam_one_equals_greedy(micro):
    ids, img = inputs(pad_last=False)
    with torch.no_grad():
        enc = micro.encode(ids, img)
        greedy = generate(micro, enc, GenerationConfig(max_new_tokens=6))
        beam = generate(micro, enc, GenerationConfig(max_new_tokens=6, beam_size=1))
    assert [h[0].tokens for h in greedy] == [h[0].tokens for h in beam]
    assert [h[0].score for h in greedy] == pytest.approx([h[0].score for h in beam])


def test_padding_does_not_change_other_rows(micro):
    ids, img = inputs(batch=2, pad_last=False)
    padded = torch.cat([ids, torch.ones(2, 3, dtype=torch.long)], dim=1)
    dec = torch.tensor([[0, 5, 6], [0, 7, 8]])
    with torch.no_grad():
        a, _ = micro(ids, dec, img)
        b, _ = micro(padded, dec, img)
    assert (a - b).abs().max() < 1e-4


def test_patch_mask_hides_the_image(micro):
    ids, img = inputs(batch=2, pad_last=False)
    dec = torch.tensor([[0, 5], [0, 7]])
    masks = torch.tensor([False, False])
    with torch.no_grad():
        a, _ = micro(ids, dec, img, masks)
        b, _ = micro(ids, dec, torch.randn_like(img), masks)
    assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize(
    "name,overrides",
    [("micro", {}), ("shapes", {}), ("micro", {"image_skip": True, "image_pos_content": True})],
)
def test_forward_backward_every_parameter_gets_gradient(name, overrides):
    torch.manual_seed(0)
    model = build_model(name, **overrides).train()
    size = model.config.patch_image_size
    ids, img = inputs(batch=2, image=size)
    dec = torch.randint(4, 1000, (2, 5))
    dec[:, 0] = 0
    logits, _ = model(ids, dec, img, code_mask=torch.tensor([False, True]))
    assert torch.isfinite(logits).all()
    logits.logsumexp(-1).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []


def test_named_sizes_match_ofa_parameter_counts():
    expected = {"tiny": 33.49e6, "medium": 92.89e6, "base": 182.24e6, "large": 472.98e6, "huge": 929.49e6}
    for name, count in expected.items():
        with torch.device("meta"):
            got = build_model(name).num_parameters()
        assert abs(got - count) < 0.01e6, (name, got)
    assert {"tiny", "medium", "base", "large", "huge", "micro", "shapes"} <= set(list_models())


def test_fresh_attention_is_not_uniform():
    """A new model's attention logits must differ by more than a rounding error, or heads attend
    uniformly for hundreds of steps (N(0, 0.02) matrices gave a std of ~0.07 at width 256)."""
    torch.manual_seed(0)
    for name in ("micro", "shapes"):
        model = build_model(name, vocab_size=300)
        attn, d = model.encoder.layers[0].self_attn, model.config.d_model
        x = torch.nn.functional.layer_norm(torch.randn(1, 64, d), (d,))
        logits = attn.split(attn.q_proj(x)) @ attn.split(attn.k_proj(x)).transpose(-1, -2) * attn.scaling
        assert logits.std() > 0.4, (name, float(logits.std()))


def test_config_errors_are_named():
    with pytest.raises(ValueError, match="unknown model size 'gigantic'"):
        model_config("gigantic")
    with pytest.raises(ValueError, match="not divisible by encoder_heads"):
        OFAConfig(d_model=100, encoder_heads=3)
    with pytest.raises(ValueError, match="unknown OFAConfig fields"):
        OFAConfig.from_dict({"d_model": 64, "bogus": 1})


def test_too_large_image_is_refused(micro):
    ids = torch.randint(4, 100, (1, 3))
    with pytest.raises(ValueError, match="patch grid"):
        micro.encode(ids, torch.zeros(1, 3, 16 * 43, 16))


def test_added_image_modules_at_zero_are_the_plain_model():
    """Fine-tuning with image_skip / image_pos_content / image_tokens turned on starts from the
    checkpoint's exact function; trained, each added module changes what the encoder sees."""
    from ofa_unified.checkpoint import CheckpointError, load_with_new_modules

    plain = randomized(build_model("micro"))
    extra = build_model("micro", image_skip=True, image_pos_content=True, image_tokens=True).eval()
    assert load_with_new_modules(extra, plain.state_dict(), "plain") == [
        "encoder.image_skip_proj.weight",
        "encoder.image_skip_proj.bias",
        "encoder.image_pos_proj.weight",
        "encoder.image_pos_proj.bias",
        "encoder.image_code_proj.weight",
        "encoder.image_code_proj.bias",
    ]
    ids, img = inputs()
    codes = torch.randint(500, 600, (3, 8, 8))  # a 64 px image: 4x4 patches, 8x8 codes
    dec = torch.randint(4, 1000, (3, 4))
    with torch.no_grad():
        want, _ = plain(ids, dec, img)
        got, _ = extra(ids, dec, img, image_codes=codes)
        torch.testing.assert_close(got, want)
        enc = extra.encoder
        for proj in (enc.image_skip_proj, enc.image_pos_proj, enc.image_code_proj):
            proj.weight.normal_()
            moved, _ = extra(ids, dec, img, image_codes=codes)
            assert (moved - want).abs().max() > 1e-3
            proj.weight.zero_()
    with pytest.raises(CheckpointError, match="missing tensors.*layer_norm"):
        state = {k: v for k, v in plain.state_dict().items() if k != "encoder.layer_norm.weight"}
        load_with_new_modules(extra, state, "plain")


def test_image_expert_routes_rows_and_leaves_text_rows_untouched():
    """With image_expert, image-output rows run their own FFNs and read image_tokens; text rows run
    the shared weights only, so changing every IMAGE_OUTPUT_PARAMS tensor moves image rows and
    leaves text rows' logits bit for bit as they were. A mixed batch equals its rows run alone."""
    import re

    from ofa_unified.model import IMAGE_OUTPUT_PARAMS

    model = randomized(build_model("micro", image_expert=True, image_tokens=True, dropout=0.0))
    ids, img = inputs(pad_last=False)
    codes = torch.randint(500, 600, (3, 8, 8))
    dec = torch.randint(513, 600, (3, 5))
    code = torch.tensor([True, False, True])
    with torch.no_grad():
        mixed, _ = model(ids, dec, img, code_mask=code, image_codes=codes)
        for row in range(3):
            alone, _ = model(
                ids[[row]], dec[[row]], img[[row]], code_mask=code[[row]], image_codes=codes[[row]]
            )
            torch.testing.assert_close(mixed[row], alone[0], atol=1e-4, rtol=1e-4)
        gen = torch.Generator().manual_seed(3)
        pattern = re.compile(IMAGE_OUTPUT_PARAMS)
        moved = [n for n, p in model.named_parameters() if pattern.search(n)]
        assert any(".image_ffn." in n for n in moved) and "encoder.image_code_proj.weight" in moved
        assert not any(n.startswith("encoder.layers.0.fc1") or "embed_tokens" in n for n in moved)
        for name, p in model.named_parameters():
            if pattern.search(name):
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
        after, _ = model(ids, dec, img, code_mask=code, image_codes=codes)
    assert torch.equal(after[1], mixed[1])
    assert (after[[0, 2]] - mixed[[0, 2]]).abs().amin(-1).max() > 1e-3


def test_image_expert_starts_as_a_copy_of_the_shared_ffn():
    """Turning image_expert on in a fine-tune copies each layer's FFN into its expert, so the model
    computes what the checkpoint did, for image and text rows alike."""
    from ofa_unified.checkpoint import load_with_new_modules

    plain = randomized(build_model("micro", dropout=0.0))
    expert = build_model("micro", image_expert=True, dropout=0.0).eval()
    new = load_with_new_modules(expert, plain.state_dict(), "plain")
    assert "decoder.layers.0.image_ffn.fc2.weight" in new and "encoder.layers.0.image_ffn.fc1.bias" in new
    assert len(new) == 8 * (expert.config.encoder_layers + expert.config.decoder_layers)
    assert torch.equal(expert.decoder.layers[0].image_ffn.fc2.weight, plain.decoder.layers[0].fc2.weight)
    ids, img = inputs()
    dec = torch.randint(513, 600, (3, 4))
    code = torch.tensor([True, False, True])
    with torch.no_grad():
        want, _ = plain(ids, dec, img, code_mask=code)
        got, _ = expert(ids, dec, img, code_mask=code)
    torch.testing.assert_close(got, want)


def test_image_tokens_read_each_patch_own_codes():
    """With image_tokens a patch sees the mean embedding of the codes it covers, and only those:
    changing the codes under one patch changes the encoder input of that patch alone."""
    torch.manual_seed(0)
    model = build_model("micro", image_tokens=True, dropout=0.0).eval()
    ids, img = inputs(batch=1, pad_last=False)
    codes = torch.randint(500, 600, (1, 8, 8))
    with torch.no_grad():
        before, _, _ = model.encoder.embed_patches(img, None, codes)
        changed = codes.clone()
        changed[0, 2:4, 4:6] = 7  # the 2x2 codes of patch (row 1, column 2)
        after, _, _ = model.encoder.embed_patches(img, None, changed)
        pooled = model.encoder.embed_tokens(codes[0, 2:4, 4:6]).mean((0, 1))
        normed = (pooled - pooled.mean()) / (pooled.var(unbiased=False) + 1e-5).sqrt()
        torch.testing.assert_close(model.encoder._code_embeddings(codes, 4, 4)[0, 6], normed)
    moved = (after - before).abs().amax(-1)[0]
    assert moved.nonzero().flatten().tolist() == [1 * 4 + 2]
    with pytest.raises(ValueError, match="pass image_codes"):
        model.encode(ids, img)
    with pytest.raises(ValueError, match="7x7 code grid does not pool onto the 4x4 patch grid"):
        model.encode(ids, img, image_codes=codes[:, :7, :7])


def test_rows_without_an_image_stay_out_of_batchnorm_statistics():
    """Training on a batch that mixes image and no-image rows normalises the image rows as a batch
    of those rows alone would, and leaves the no-image rows' encoder output unaffected by pixels."""
    torch.manual_seed(0)
    model = build_model("micro", dropout=0.0).train()
    ids, img = inputs(batch=3, pad_last=False)
    mixed = model.encoder(ids, img, torch.tensor([True, False, True]))
    alone = model.encoder(ids[[0, 2]], img[[0, 2]], torch.tensor([True, True]))
    torch.testing.assert_close(mixed.hidden[[0, 2]], alone.hidden)
    noise = img.clone()
    noise[1] = torch.randn_like(noise[1]) * 10
    again = model.encoder(ids, noise, torch.tensor([True, False, True]))
    torch.testing.assert_close(again.hidden[1], mixed.hidden[1])


def test_precise_batchnorm_averages_the_statistics_of_the_batches():
    from ofa_unified.data.pipeline import image_batches
    from ofa_unified.resnet import precise_batchnorm

    torch.manual_seed(0)
    stem = build_model("micro").encoder.embed_images.eval()
    assert [len(b) for b in image_batches("shapes", 10, 64, batch_size=4)] == [4, 4, 2]
    batches = list(image_batches("shapes", 12, 64, batch_size=4))
    precise_batchnorm(stem, batches)
    assert not stem.training
    with torch.no_grad():
        first = [stem.conv1(b) for b in batches]  # bn1 normalises conv1's output
    mean = torch.stack([f.mean((0, 2, 3)) for f in first]).mean(0)
    var = torch.stack([f.var((0, 2, 3)) for f in first]).mean(0)
    torch.testing.assert_close(stem.bn1.running_mean, mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stem.bn1.running_var, var, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="at least one image"):
        next(image_batches("shapes", 0, 64))
