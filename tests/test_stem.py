"""Stem pretraining (train/stem.py), saving/loading a stem, and multitask training with it frozen."""

from __future__ import annotations

import json

import pytest
import torch

from ofa_unified import load_checkpoint
from ofa_unified.checkpoint import load_stem
from ofa_unified.data.pipeline import build_shapes_vocab
from ofa_unified.resnet import ResNet

stem_script = pytest.importorskip("train.stem")
multitask = pytest.importorskip("train.multitask")


@pytest.fixture(scope="module")
def stem_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("stem")
    args = ["--model", "micro", "--out", str(out), "--steps", "6", "--batch-size", "4", "--warmup", "2"]
    stem_script.main([*args, "--val-images", "8", "--workers", "0", "--threads", "1", "--no-progress"])
    return out


def test_pretraining_writes_a_loadable_stem_with_its_metrics(stem_dir):
    meta = json.loads((stem_dir / "stem.json").read_text())
    assert meta["model"] == "micro" and meta["steps"] == 6 and meta["resnet_width"] == 8
    assert {"color_acc", "shape_acc", "size_acc", "background_acc", "box_l1_px"} <= set(meta["val"])
    stem = ResNet((1, 1, 1), width=8)
    assert load_stem(stem, stem_dir) == meta
    state = torch.load(stem_dir / "train_state.pt", weights_only=True)["stem"]
    assert all(torch.equal(v, state[k]) for k, v in stem.state_dict().items())


def test_pretraining_lowers_the_dense_loss():
    torch.manual_seed(0)
    stem = ResNet((1, 1, 1), width=8)
    head = stem_script.DenseHead(stem.out_channels)
    data = stem_script.DenseScenes("train", 64)
    images, labels = torch.utils.data.default_collate([data[i] for i in range(8)])
    opt = torch.optim.Adam([*stem.parameters(), *head.parameters()], lr=3e-3)
    losses = []
    for _ in range(30):
        loss = stem_script.dense_loss(head(stem(images)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_a_stem_of_another_shape_is_refused_by_name(stem_dir):
    wrong = r"stem.safetensors does not fit .*bn1.bias: file \(8,\) vs model \(16,\)"
    with pytest.raises(ValueError, match=wrong):
        load_stem(ResNet((1, 1, 1), width=16), stem_dir)
    with pytest.raises(FileNotFoundError, match="holds no pretrained stem"):
        load_stem(ResNet((1, 1, 1), width=8), stem_dir / "missing")


def test_multitask_loads_the_stem_and_keeps_it_frozen(tmp_path, stem_dir):
    build_shapes_vocab(tmp_path / "vocab", 320, num_codes=16, num_bins=32, num_scenes=30)
    args = [
        "--config", "train/configs/micro.py", "--out", str(tmp_path / "run"),
        "--vocab", str(tmp_path / "vocab"),
        "--tasks", "caption=1,grounding=1", "--train-scenes", "4", "--batch-size", "4", "--max-steps", "3",
        "--eval-interval", "0", "--eval-samples", "0", "--eval-generate", "0", "--num-workers", "0",
        "--no-progress", "--threads", "1", "--stem", str(stem_dir), "--freeze-stem",
    ]  # fmt: skip
    multitask.main(args)
    trained = load_checkpoint(tmp_path / "run" / "model").model
    pretrained = ResNet((1, 1, 1), width=8)
    load_stem(pretrained, stem_dir)
    after = trained.encoder.embed_images.state_dict()
    # weights and BatchNorm statistics (running means, batch counts) all as pretrained
    assert all(torch.equal(v, after[k]) for k, v in pretrained.state_dict().items())
    optimizer = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)["optimizer"]
    optimized = sum(len(g["params"]) for g in optimizer["param_groups"])
    stem_params = len(list(trained.encoder.embed_images.parameters()))
    assert optimized == len(list(trained.parameters())) - stem_params  # the optimizer never sees the stem
