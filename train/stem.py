"""Pretrain the image stem (the ResNet) on dense shapes-world labels.

OFA starts its ResNet from ImageNet weights; this project has no downloads, so the stem learns here
what an object is: every cell of its stride-16 output grid predicts the colour, shape and size of
the object covering it (or background) and that object's box. Trained end to end from scratch inside
the multitask mix, the stem dropped colour (bench/README.md, "What the image stem keeps"); a stem
pretrained this way and frozen (`train/multitask.py --stem DIR --freeze-stem`) keeps it.

    python train/stem.py --model shapes --steps 1500 --out checkpoints/stem

Every batch is fresh train-split scenes; `--resume` continues from OUT/train_state.pt. The run ends
with per-cell accuracies on val scenes (objects' cells only, and background), written to
`stem.json` next to `stem.safetensors`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ofa_unified.checkpoint import save_stem  # noqa: E402
from ofa_unified.data.preprocess import image_to_tensor  # noqa: E402
from ofa_unified.data.shapes import (  # noqa: E402
    ATTRIBUTES,
    COLORS,
    SHAPES,
    SIZES,
    SPLIT_SIZE,
    cell_labels,
    sample,
)
from ofa_unified.model import model_config  # noqa: E402
from ofa_unified.resnet import ResNet  # noqa: E402
from train.vq_tokenizer import lr_at  # noqa: E402  (warmup, then cosine to 10%: the same schedule)

STATE_NAME = "train_state.pt"
STRIDE = 16  # the stem's output stride
CLASSES = {"color": len(COLORS) + 1, "shape": len(SHAPES) + 1, "size": len(SIZES) + 1}  # + background
BOX_WEIGHT = 5.0  # L1 on box offsets (fractions of the image side) against the three cross-entropies


class DenseScenes(Dataset):
    """Scene i of a split: the normalised image and its `cell_labels` at the stem's output grid."""

    def __init__(self, split: str, image_size: int):
        self.split, self.image_size = split, image_size

    def __len__(self) -> int:
        return SPLIT_SIZE

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image, scene = sample(self.split, i, self.image_size)
        labels = cell_labels(scene, self.image_size // STRIDE)
        return image_to_tensor(image), {k: torch.from_numpy(v) for k, v in labels.items()}


class DenseHead(nn.Module):
    """A 1x1 convolution per target on the stem's last stage; discarded after pretraining."""

    def __init__(self, channels: int):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Conv2d(channels, n, 1) for k, n in CLASSES.items()})
        self.heads["box"] = nn.Conv2d(channels, 4, 1)

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: head(feats) for k, head in self.heads.items()}


def dense_loss(out: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = sum(F.cross_entropy(out[k], labels[k]) for k in ATTRIBUTES)
    fg = labels["color"] > 0
    if fg.any():
        loss = loss + BOX_WEIGHT * F.l1_loss(out["box"].permute(0, 2, 3, 1)[fg], labels["box"][fg])
    return loss


@torch.no_grad()
def evaluate(stem: ResNet, head: DenseHead, loader: DataLoader, device: str) -> dict[str, float]:
    """Per-cell accuracy of each attribute on object cells, background accuracy, box L1 in pixels."""
    stem.eval()
    hits, counts = {k: 0 for k in (*ATTRIBUTES, "background")}, {"fg": 0, "bg": 0}
    box_err = 0.0
    image_size = 0
    for images, labels in loader:
        image_size = images.shape[-1]
        out = head(stem(images.to(device)))
        fg = labels["color"] > 0
        for k in ATTRIBUTES:
            hits[k] += int((out[k].argmax(1).cpu() == labels[k])[fg].sum())
        hits["background"] += int((out["color"].argmax(1).cpu() == 0)[~fg].sum())
        box_err += float((out["box"].permute(0, 2, 3, 1).cpu()[fg] - labels["box"][fg]).abs().sum())
        counts["fg"], counts["bg"] = counts["fg"] + int(fg.sum()), counts["bg"] + int((~fg).sum())
    stem.train()
    metrics = {f"{k}_acc": hits[k] / max(1, counts["fg"]) for k in ATTRIBUTES}
    metrics["background_acc"] = hits["background"] / max(1, counts["bg"])
    metrics["box_l1_px"] = box_err * image_size / max(1, 4 * counts["fg"])
    return {k: round(v, 4) for k, v in metrics.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="shapes", help="named model size whose stem to train")
    parser.add_argument("--out", default="checkpoints/stem")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW lr (warmup, then cosine to 10%%)")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--val-images", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader processes rendering scenes")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ckpt-every", type=int, default=250)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = model_config(args.model)
    stem = ResNet(tuple(cfg.resnet_layers), cfg.resnet_width).to(args.device)
    head = DenseHead(stem.out_channels).to(args.device)
    params = [*stem.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    step = 0
    if args.resume and (out / STATE_NAME).exists():
        state = torch.load(out / STATE_NAME, map_location=args.device, weights_only=True)
        stem.load_state_dict(state["stem"])
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]

    def loader(split: str, start: int, stop: int) -> DataLoader:
        return DataLoader(
            DenseScenes(split, cfg.patch_image_size),
            batch_size=args.batch_size,
            sampler=range(start, stop),
            num_workers=args.workers,
        )

    batches = loader("train", step * args.batch_size, args.steps * args.batch_size)
    bar = tqdm(total=args.steps, initial=step, disable=args.no_progress, dynamic_ncols=True, desc="stem")
    started = time.time()
    stem.train()
    for images, labels in batches:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        out_maps = head(stem(images.to(args.device)))
        loss = dense_loss(out_maps, {k: v.to(args.device) for k, v in labels.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % args.ckpt_every == 0 or step == args.steps:
            state = {"stem": stem.state_dict(), "head": head.state_dict(), "step": step}
            torch.save({**state, "optimizer": optimizer.state_dict()}, out / (STATE_NAME + ".tmp"))
            os.replace(out / (STATE_NAME + ".tmp"), out / STATE_NAME)
    bar.close()
    metrics = evaluate(stem, head, loader("val", 0, args.val_images), args.device)
    meta = {
        "model": args.model,
        "resnet_layers": list(cfg.resnet_layers),
        "resnet_width": cfg.resnet_width,
        "image_size": cfg.patch_image_size,
        "steps": step,
        "batch_size": args.batch_size,
        "seconds_this_run": round(time.time() - started, 1),
        "val": metrics,
    }
    save_stem(stem, out, meta)
    print(metrics)
    return metrics


if __name__ == "__main__":
    main()
