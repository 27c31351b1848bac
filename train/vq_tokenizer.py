"""Train the VQ image tokenizer on shapes-world images (CPU-sized).

Full run (~12 minutes on one core of the shared 2-core CPU at ~0.17 s/step; measured with the
default config: 1500 steps -> 29.0 dB, 2500 steps (dead-code-steps 20) -> 29.6 dB test PSNR, 99%
of the 1024 codes used; 4000 steps is expected to reach ~30 dB). Under contention prefer --threads 1
(2 threads ran slower there):
    python train/vq_tokenizer.py --out checkpoints/vq --steps 4000 --threads 1

Every VQConfig field is a flag (`--codebook-size 512`, `--channels 128`, ...). The training images
are rendered once into a uint8 cache; each step takes random 64 px crops with flips (the tokenizer
is fully convolutional, so crops train the same weights that run on full images, 4x cheaper per
sample). `--resume` continues exactly from `train_state.pt` (model, optimizer, step, RNG states);
the model config then comes from the checkpoint. The run ends with an eval on val images: mean
per-image PSNR of decode(encode(x)) and the share of the K codes used, printed as JSON and written
to `metrics.json` next to `vq.safetensors` / `vq_config.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ofa_unified.data.shapes import render_images  # noqa: E402
from ofa_unified.vq import VQConfig, VQTokenizer  # noqa: E402

STATE_NAME = "train_state.pt"
METRICS_NAME = "metrics.json"


@dataclass
class TrainResult:
    """What a run did: per-step losses of this invocation (from `start_step`) and the final metrics."""

    start_step: int
    losses: list[float] = field(default_factory=list)
    metrics: dict | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="checkpoints/vq", help="directory for weights, state and metrics")
    parser.add_argument("--steps", type=int, default=4000, help="total optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=8e-4, help="peak Adam lr (warmup, then cosine to 10%%)")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--crop-size", type=int, default=64, help="random training crop (0 = full image)")
    parser.add_argument("--train-images", type=int, default=4000, help="size of the rendered train cache")
    parser.add_argument("--val-images", type=int, default=256)
    parser.add_argument("--eval-split", default="val", choices=("val", "test"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--ckpt-every", type=int, default=500)
    parser.add_argument("--log-every", type=int, default=50, help="progress-bar refresh (steps)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    parser.add_argument(
        "--stop-after", type=int, default=0, help="checkpoint and exit at this step (0 = off)"
    )
    parser.add_argument("--no-progress", action="store_true", help="disable the tqdm bar")
    config = parser.add_argument_group("model (VQConfig fields)")
    for f in dataclasses.fields(VQConfig):
        default = getattr(VQConfig(), f.name)
        config.add_argument("--" + f.name.replace("_", "-"), type=type(default), default=default)
    return parser.parse_args(argv)


def render_cache(split: str, n: int, image_size: int) -> torch.Tensor:
    """n shapes images as uint8 [n, 3, S, S] (rendering ~5 ms each; converting per batch is cheaper)."""
    return torch.from_numpy(render_images(split, n, image_size)).permute(0, 3, 1, 2).contiguous()


def get_batch(cache: torch.Tensor, batch_size: int, crop: int, gen: torch.Generator) -> torch.Tensor:
    """Random images, random crop and horizontal flip, as floats in [-1, 1]."""
    idx = torch.randint(len(cache), (batch_size,), generator=gen)
    size = cache.shape[-1]
    crop = crop or size
    offsets = torch.randint(size - crop + 1, (batch_size, 2), generator=gen)
    flips = torch.rand(batch_size, generator=gen) < 0.5
    out = []
    for i, (y, x), flip in zip(idx.tolist(), offsets.tolist(), flips.tolist(), strict=True):
        img = cache[i, :, y : y + crop, x : x + crop]
        out.append(img.flip(-1) if flip else img)
    return torch.stack(out).float() / 127.5 - 1.0


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine from lr down to 10% of lr at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def save_state(path: Path, model, optimizer, step: int, gen: torch.Generator) -> None:
    """Everything needed to resume bit-exactly, written to a temp name then renamed."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "config": model.config.to_dict(),
        "torch_rng": torch.get_rng_state(),
        "data_rng": gen.get_state(),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> TrainResult:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_NAME
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    state = None
    if args.resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        config = VQConfig.from_dict(state["config"])
    else:
        config = VQConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(VQConfig)})
    model = VQTokenizer(config).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.99))
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        torch.set_rng_state(state["torch_rng"])
        gen.set_state(state["data_rng"])

    cache = render_cache("train", args.train_images, args.image_size)
    result = TrainResult(start_step=step)
    end = min(args.steps, args.stop_after) if args.stop_after else args.steps
    model.train()
    bar = tqdm(total=end, initial=step, disable=args.no_progress, dynamic_ncols=True, desc="vq")
    started = time.time()
    while step < end:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        images = get_batch(cache, args.batch_size, args.crop_size, gen).to(args.device)
        _, losses = model(images)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        step += 1
        result.losses.append(losses["loss"].item())
        bar.update(1)
        if step % args.log_every == 0 or step == end:
            bar.set_postfix(
                loss=f"{losses['loss'].item():.4f}",
                psnr=f"{losses['psnr'].item():.2f}",
                usage=f"{model.pop_usage():.2f}",  # codes chosen during the last log_every steps
                restarts=model.num_restarts,
            )
        if step % args.ckpt_every == 0 or step == end:
            save_state(state_path, model, optimizer, step, gen)
            model.save(out)
    bar.close()
    elapsed = time.time() - started

    if step >= args.steps:
        metrics = model.reconstruction_metrics(
            render_cache(args.eval_split, args.val_images, args.image_size)
        )
        metrics.update(split=args.eval_split, step=step, restarts=model.num_restarts)
        metrics["sec_per_step"] = round(elapsed / max(1, step - result.start_step), 4)
        (out / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n")
        print(json.dumps(metrics))
        result.metrics = metrics
    return result


if __name__ == "__main__":
    main()
