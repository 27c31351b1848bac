"""What the image stem keeps: linear-probe accuracy of each object's colour and shape from the
features at the object's centre, after each ResNet stage and at the transformer's input.

    python bench/probe_features.py --checkpoint checkpoints/default --out bench/results/probe_default.json

A task that names colours (VQA, detection labels, grounded captions, infilling codes) can only be
learned if colour reaches the transformer. Train scenes fit a logistic-regression probe per site,
val scenes score it; chance is 1/6 for both. `--random-init` probes the same architecture at its
initial weights, the baseline a trained stem should not fall below.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ofa_unified.checkpoint import load_checkpoint
from ofa_unified.data import shapes
from ofa_unified.data.preprocess import ImageTransform
from ofa_unified.inference import VQ_DIR
from ofa_unified.model import OFAModel
from ofa_unified.vq import VQTokenizer, encoder_codes

REPO = Path(__file__).resolve().parents[1]
ATTRIBUTES = {"color": list(shapes.COLORS), "shape": list(shapes.SHAPES)}


@torch.no_grad()
def features(model: OFAModel, images: torch.Tensor, codes: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """[B, C, h, w] maps per site: the three ResNet stages, the patch embeddings the transformer
    takes in (with the VQ code term for an `image_tokens` model), and the encoder's output at the
    patches."""
    enc = model.encoder
    out = {f"layer{i + 1}": s for i, s in enumerate(enc.embed_images.stages(images))}
    h, w = out["layer3"].shape[-2:]
    patches, _, _ = enc.embed_patches(images, None, codes)
    ids = torch.zeros(images.shape[0], 1, dtype=torch.long)  # one text token; the patches are read
    output = enc(ids, images, None, codes).hidden[:, : h * w]
    for site, x in (("encoder_input", patches), ("encoder_output", output)):
        out[site] = x.transpose(1, 2).unflatten(2, (h, w))
    return out


def probe_data(
    model: OFAModel, codes_of: Callable, split: str, n: int, size: int
) -> tuple[dict[str, torch.Tensor], dict]:
    """Per-object features at each site (at the object's centre) and its colour/shape labels."""
    transform = ImageTransform(size)
    images, scenes = [], []
    for i in range(n):
        image, scene = shapes.sample(split, i)
        images.append(transform(image)[0])
        scenes.append(scene)
    batch = torch.stack(images)
    maps = features(model, batch, codes_of(batch))
    xs: dict[str, list] = {site: [] for site in maps}
    labels: dict[str, list] = {a: [] for a in ATTRIBUTES}
    for k, scene in enumerate(scenes):
        for obj in scene.objects:
            for site, fmap in maps.items():
                stride = size / fmap.shape[-1]
                xs[site].append(fmap[k, :, int(obj.center[1] // stride), int(obj.center[0] // stride)])
            for attr, values in ATTRIBUTES.items():
                labels[attr].append(values.index(getattr(obj, attr)))
    return {s: torch.stack(v) for s, v in xs.items()}, {a: torch.tensor(v) for a, v in labels.items()}


def fit_and_score(
    x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor
) -> float:
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    torch.manual_seed(0)
    probe = torch.nn.Linear(x_train.shape[1], int(y_train.max()) + 1)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(probe(x_train), y_train).backward()
        opt.step()
    return float((probe(x_val).argmax(1) == y_val).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / "default")
    parser.add_argument(
        "--random-init", action="store_true", help="the checkpoint's architecture, fresh weights"
    )
    parser.add_argument("--train-scenes", type=int, default=300)
    parser.add_argument("--val-scenes", type=int, default=100)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    loaded = load_checkpoint(args.checkpoint)
    model = loaded.model.float()
    vq = VQTokenizer.load(args.checkpoint / VQ_DIR) if model.config.image_tokens else None
    codes_of = functools.partial(encoder_codes, model.config, vq, loaded.vocab)
    if args.random_init:
        torch.manual_seed(0)
        model = OFAModel(model.config)
    model.eval()
    size = model.config.patch_image_size
    x_train, y_train = probe_data(model, codes_of, "train", args.train_scenes, size)
    x_val, y_val = probe_data(model, codes_of, "val", args.val_scenes, size)
    report = {
        "checkpoint": str(args.checkpoint),
        "random_init": args.random_init,
        "objects": {"train": len(y_train["color"]), "val": len(y_val["color"])},
        "val_accuracy": {
            attr: {
                site: round(fit_and_score(x_train[site], y_train[attr], x_val[site], y_val[attr]), 3)
                for site in x_train
            }
            for attr in ATTRIBUTES
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
