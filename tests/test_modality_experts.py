"""Modality experts (VLMo's MoME), the retrieval head (`embed`, `itc_loss`), and the itc / prefix_lm
tasks through the data pipeline and the trainer: tiny random-weight models, seconds each."""

from __future__ import annotations

import json
import random
from collections import defaultdict

import pytest
import torch

from ofa_unified.checkpoint import CheckpointError, hf_config, load_with_new_modules
from ofa_unified.data.pipeline import ShapesMultitask, build_shapes_vocab, collate, split_by_output
from ofa_unified.model import OFAConfig, build_model, in_batch_recall, itc_loss
from ofa_unified.tasks import get_task, prefix_split

EXPERTS = ("fc1", "vision_ffn", "vl_ffn", "image_ffn")  # "fc1": the layer's own (language) FFN
multitask = pytest.importorskip("train.multitask")


def randomized(model):
    """Non-trivial weights (zero relative tables and unit scales would hide routing bugs)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_scale = p.dim() == 1 and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if is_scale else 0.0))
    return model.eval()


def experts_model(**overrides):
    torch.manual_seed(0)
    cfg = dict(encoder_layers=2, modality_experts=True, fusion_layers=1, itc_dim=16, dropout=0.0)
    return randomized(build_model("micro", **{**cfg, **overrides}))


def inputs(batch=2, src=5):
    gen = torch.Generator().manual_seed(1)
    return torch.randint(4, 1000, (batch, src), generator=gen), torch.randn(batch, 3, 64, 64, generator=gen)


def expert_calls(model):
    """{(layer, expert): [tokens per call]} of the encoder FFNs run during the returned context."""
    calls: dict[tuple[int, str], list[int]] = defaultdict(list)
    handles = []
    for i, layer in enumerate(model.encoder.layers):
        for name in EXPERTS:
            fc1 = layer.fc1 if name == "fc1" else getattr(getattr(layer, name), "fc1", None)
            if fc1 is not None:
                hook = lambda m, args, out, key=(i, name): calls[key].append(args[0].shape[:-1].numel())
                handles.append(fc1.register_forward_hook(hook))
    return calls, handles


def run_counting(model, fn):
    calls, handles = expert_calls(model)
    with torch.no_grad():
        fn()
    for h in handles:
        h.remove()
    return {k: sum(v) for k, v in calls.items()}


def test_image_alone_and_text_alone_run_only_their_own_expert():
    model = experts_model()
    ids, img = inputs()
    patches = 2 * (64 // 16) ** 2
    assert run_counting(model, lambda: model.embed(patch_images=img)) == {
        (0, "vision_ffn"): patches,
        (1, "vision_ffn"): patches,
    }
    assert run_counting(model, lambda: model.embed(input_ids=ids)) == {
        (0, "fc1"): ids.numel(),
        (1, "fc1"): ids.numel(),
    }


def test_fused_input_runs_the_vl_expert_in_the_fusion_layers_only():
    model = experts_model()
    ids, img = inputs()
    patches = 2 * (64 // 16) ** 2
    calls = run_counting(model, lambda: model.encode(ids, img))
    assert calls == {
        (0, "vision_ffn"): patches,
        (0, "fc1"): ids.numel(),
        (1, "vl_ffn"): patches + ids.numel(),
    }
    # a row without an image (text_to_image, text-only prefix_lm) routes by position in the fusion layer too
    calls = run_counting(model, lambda: model.encode(ids, img, torch.tensor([True, False])))
    assert calls[(1, "vl_ffn")] == (patches + ids.numel()) // 2
    assert calls[(1, "vision_ffn")] == patches // 2 and calls[(1, "fc1")] == ids.numel() // 2


def test_image_output_rows_keep_the_image_expert_everywhere():
    model = experts_model(image_expert=True)
    ids, img = inputs()
    calls = run_counting(model, lambda: model.encode(ids, img, code_mask=torch.tensor([True, False])))
    row = (64 // 16) ** 2 + ids.size(1)
    assert calls[(0, "image_ffn")] == calls[(1, "image_ffn")] == row
    assert calls[(1, "vl_ffn")] == row and calls[(0, "vision_ffn")] == row - ids.size(1)


def test_unused_experts_are_never_read():
    """Poison every expert an input must not use: its output stays finite."""
    model = experts_model()
    ids, img = inputs()
    clean = {k: v.clone() for k, v in model.state_dict().items()}
    for alone, unused in (
        ({"patch_images": img}, ("", "vl_ffn.")),
        ({"input_ids": ids}, ("vision_ffn.", "vl_ffn.")),
    ):
        model.load_state_dict(clean)
        with torch.no_grad():
            for name, p in model.encoder.layers.named_parameters():
                if any(name.split(".", 1)[1].startswith(f"{u}fc1.") for u in unused):
                    p.fill_(float("nan"))
            assert model.embed(**alone).isfinite().all()
            assert not model.encode(ids, img).hidden.isfinite().all()  # the poison is there


def test_experts_start_as_copies_so_a_fine_tune_starts_from_the_checkpoint():
    plain = randomized(build_model("micro", encoder_layers=2, image_expert=True, dropout=0.0))
    model = build_model(
        plain.config, modality_experts=True, fusion_layers=1, itc_dim=16, image_expert=True
    ).eval()
    new = load_with_new_modules(model, plain.state_dict(), "test")
    assert any(".vision_ffn." in k for k in new) and any(".vl_ffn." in k for k in new)
    assert model.itc_image_proj.weight.abs().sum() > 0  # the retrieval head is fresh, not zero
    assert model.itc_logit_scale.item() == pytest.approx(2.6593, abs=1e-4)  # log(1 / 0.07)
    ids, img = inputs(batch=3)
    dec = torch.randint(4, 1000, (3, 6), generator=torch.Generator().manual_seed(2))
    args = (ids, dec, img, torch.tensor([True, False, True]), torch.tensor([False, False, True]))
    with torch.no_grad():
        # float rounding only: a matmul over a subset of the rows may round differently (logits ~5)
        assert torch.allclose(model(*args)[0], plain(*args)[0], rtol=0, atol=1e-5)


def test_options_off_add_nothing():
    names = set(build_model("micro").state_dict())
    assert not [n for n in names if "vision_ffn" in n or "vl_ffn" in n or n.startswith("itc_")]
    assert not build_model("micro").has_retrieval


def test_config_checks_and_hf_export_refuses_the_options():
    with pytest.raises(ValueError, match="needs modality_experts"):
        OFAConfig(fusion_layers=1)
    with pytest.raises(ValueError, match="fusion_layers must be in"):
        OFAConfig(modality_experts=True, fusion_layers=5)
    with pytest.raises(ValueError, match="itc_dim"):
        OFAConfig(itc_dim=-1)
    cfg = OFAConfig(modality_experts=True, fusion_layers=2, itc_dim=8)
    with pytest.raises(CheckpointError, match="modality_experts, fusion_layers, itc_dim"):
        hf_config(cfg)


def test_embed_is_unit_norm_and_refuses_bad_input():
    model = experts_model()
    ids, img = inputs()
    ids[1, 3:] = 1  # padding does not change the text's embedding
    emb = model.embed(input_ids=ids)
    assert emb.shape == (2, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(emb[1], model.embed(input_ids=ids[1:, :3])[0], atol=1e-5)
    assert torch.allclose(model.embed(patch_images=img).norm(dim=-1), torch.ones(2), atol=1e-5)
    for bad in ({}, {"input_ids": ids, "patch_images": img}):
        with pytest.raises(ValueError, match="exactly one"):
            model.embed(**bad)
    with pytest.raises(ValueError, match="no retrieval head"):
        build_model("micro").embed(input_ids=ids)


def test_itc_loss_is_symmetric_and_lowest_for_matched_pairs():
    gen = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    texts = torch.nn.functional.normalize(images + 0.1 * torch.randn(6, 8, generator=gen), dim=-1)
    scale = torch.tensor(10.0)
    assert itc_loss(images, texts, scale) == pytest.approx(itc_loss(texts, images, scale).item())
    assert itc_loss(images, texts, scale) < itc_loss(images, texts.roll(1, 0), scale)
    assert in_batch_recall(images, texts) == 1.0 and in_batch_recall(images, texts.roll(1, 0)) == 0.0


def test_a_few_dozen_itc_steps_retrieve_above_chance():
    torch.manual_seed(0)
    model = build_model("micro", modality_experts=True, itc_dim=16, dropout=0.0)
    gen = torch.Generator().manual_seed(3)
    images, ids = torch.randn(8, 3, 64, 64, generator=gen), torch.randint(4, 1000, (8, 4), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        loss = itc_loss(model.embed(patch_images=images), model.embed(input_ids=ids), model.itc_scale())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert (
            in_batch_recall(model.embed(patch_images=images), model.embed(input_ids=ids)) >= 0.5
        )  # chance 1/8


class Cut(random.Random):
    def __init__(self, cut: int):
        super().__init__(0)
        self.cut = cut

    def randint(self, a: int, b: int) -> int:
        assert 1 == a <= self.cut <= b
        return self.cut


def test_prefix_split_at_every_word_boundary():
    text = "a  small red circle above   a star"
    words = text.split()
    for cut in range(1, len(words)):
        prefix, suffix = prefix_split(text, Cut(cut))
        assert prefix + " " + suffix == " ".join(words) and len(prefix.split()) == cut
    with pytest.raises(ValueError, match="at least 2 words"):
        prefix_split("circle", random.Random(0))


def test_prefix_lm_task_is_deterministic_per_record(tmp_path):
    vocab = build_shapes_vocab(tmp_path, 320, num_codes=16, num_bins=32, num_scenes=10)
    task, record = get_task("prefix_lm"), {"text": "a red circle above a blue square", "split_seed": 3}
    source, target = task.source(record, (1, 1), vocab), task.target(record, (1, 1), vocab)
    prefix = source.split('"')[1].strip()
    assert source == task.source(record, (1, 1), vocab) and f"{prefix}{target}" == record["text"]
    assert task.evaluate([{"text": target.strip()}, None], [record, record]) == {"exact_match": 0.5}


def test_shapes_pipeline_carries_itc_pairs_and_text_only_prefix_lm(tmp_path):
    vocab = build_shapes_vocab(tmp_path, 320, num_codes=16, num_bins=32, num_scenes=10)
    ds = ShapesMultitask("train", {"itc": 1.0, "prefix_lm": 1.0, "caption": 1.0}, vocab, image_size=64)
    examples = [ds[i] for i in range(24)]
    pairs = [e for e in examples if e.task == "itc"]
    assert pairs and all(not e.target_ids and e.has_image for e in pairs)
    prefix = [e for e in examples if e.task == "prefix_lm"]
    assert {e.has_image for e in prefix} == {True, False}  # captions with their image, and text alone
    assert vocab.encode(pairs[0].record["text"]) == pairs[0].source_ids  # as retrieval queries encode it
    parts = split_by_output(collate(examples))
    assert [p["tasks"][0] == "itc" for p in parts] == [False, True]
    assert parts[1]["labels"].eq(-100).all() and len(parts[1]["tasks"]) == len(pairs)


def test_trainer_trains_itc_and_prefix_lm(tmp_path):
    vocab_dir = tmp_path / "vocab"
    build_shapes_vocab(vocab_dir, 320, num_codes=16, num_bins=32, num_scenes=10)
    args = [
        "--config", "train/configs/micro.py", "--out", str(tmp_path / "run"), "--vocab", str(vocab_dir),
        "--tasks", "caption=1,itc=2,prefix_lm=1", "--batch-size", "8", "--max-steps", "2",
        "--model-overrides", "dropout=0,modality_experts=true,itc_dim=16", "--log-interval", "1",
        "--eval-interval", "0", "--eval-samples", "16", "--eval-generate", "2", "--num-workers", "0",
        "--no-progress", "--threads", "1",
    ]  # fmt: skip
    out = multitask.main(args)
    assert 0 <= out["metrics"]["itc/recall@1"] <= 1 and out["metrics"]["val_loss/itc"] > 0
    assert "prefix_lm/exact_match" in out["metrics"] and "itc/parsed" not in out["metrics"]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/itc_loss" in line for line in lines)
    args[args.index("--model-overrides") + 1] = "dropout=0"
    with pytest.raises(ValueError, match="retrieval head"):
        multitask.main(args)
