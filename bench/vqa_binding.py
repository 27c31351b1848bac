"""Can the transformer bind an attribute to an object when the stem hands it over? A fast test bed.

    python train/stem.py --model shapes --steps 1500 --out runs/stem      # the frozen stem (11 min)
    python bench/vqa_binding.py --stem runs/stem --types color --steps 400 \
        --out bench/results/vqa_binding_color.json

The pretrained stem (per-cell colour 0.98 on val) runs once over a fixed pool of train scenes and
its features are cached, so only the transformer trains (`shapes` size, fresh weights, AdamW at
`--lr`, label smoothing 0.1): several times faster per sample than multitask training. Every
`--eval-every` steps it reports, on val questions, the loss and the teacher-forced exact-answer
accuracy with each image's own features and with another scene's (rolled by one in the batch).
A gap between the two is the model reading the image; no gap is the language prior alone.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ofa_unified.checkpoint import load_stem
from ofa_unified.data import shapes
from ofa_unified.data.preprocess import image_to_tensor
from ofa_unified.model import build_model
from ofa_unified.resnet import ResNet
from ofa_unified.tasks import get_task
from ofa_unified.vocab import BOS, EOS, PAD, Vocab

REPO = Path(__file__).resolve().parents[1]
IGNORE = -100


@torch.no_grad()
def stem_features(stem: ResNet, split: str, n: int) -> torch.Tensor:
    chunks = []
    for start in range(0, n, 128):
        images = [image_to_tensor(shapes.sample(split, i, 128)[0]) for i in range(start, min(n, start + 128))]
        chunks.append(stem.stages(torch.stack(images))[-1])
    return torch.cat(chunks)


def questions(vocab: Vocab, split: str, n: int, types: set[str]) -> list[tuple[int, list[int], list[int]]]:
    """(scene index, source ids, answer ids) of every VQA record of the wanted kinds in n scenes."""
    task, out = get_task("vqa"), []
    for i in range(n):
        image, scene = shapes.sample(split, i, 128)
        for r in shapes.scene_records(scene, shapes.record_rng(scene.seed), ["vqa"]):
            if r["question_type"] in types:
                target = task.target(r, image.size, vocab, random.Random(0))
                out.append(
                    (i, vocab.encode(task.source(r, image.size, vocab)), vocab.encode(target, False, False))
                )
    return out


def batch(items: list, feats: torch.Tensor, roll: bool = False) -> tuple[torch.Tensor, ...]:
    n, src_len = len(items), max(len(x[1]) for x in items)
    tgt_len = max(len(x[2]) for x in items) + 1
    src = torch.full((n, src_len), PAD)
    dec = torch.full((n, tgt_len), PAD)
    labels = torch.full((n, tgt_len), IGNORE)
    for j, (_, s, t) in enumerate(items):
        src[j, : len(s)] = torch.tensor(s)
        dec[j, : len(t) + 1] = torch.tensor([BOS, *t])
        labels[j, : len(t) + 1] = torch.tensor([*t, EOS])
    scenes = torch.tensor([x[0] for x in items])
    return src, feats[scenes.roll(1) if roll else scenes], dec, labels


@torch.no_grad()
def evaluate(model, val: list, feats: torch.Tensor) -> dict[str, dict[str, float]]:
    model.eval()
    out = {}
    for name, roll in (("own_image", False), ("swapped_image", True)):
        loss, tokens, correct = 0.0, 0, 0
        for start in range(0, len(val), 128):
            src, img, dec, labels = batch(val[start : start + 128], feats, roll)
            logits, _ = model(src, dec, img)
            loss += F.cross_entropy(
                logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="sum"
            ).item()
            tokens += int(labels.ne(IGNORE).sum())
            correct += int((logits.argmax(-1).eq(labels) | labels.eq(IGNORE)).all(1).sum())
        out[name] = {"loss": round(loss / tokens, 3), "accuracy": round(correct / len(val), 3)}
    model.train()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stem", type=Path, default=REPO / "runs" / "stem")
    parser.add_argument("--vocab", type=Path, default=REPO / "checkpoints" / "default")
    parser.add_argument(
        "--types", default="color", help="question kinds: color,shape,count,existence,relation"
    )
    parser.add_argument("--scenes", type=int, default=4000, help="train scenes in the cached pool")
    parser.add_argument("--val-scenes", type=int, default=512, help="val questions: the first 1024 of these")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    vocab, types = Vocab.load(args.vocab), set(args.types.split(","))
    stem = ResNet((2, 2, 2), 32)
    load_stem(stem, args.stem)
    stem.eval()
    feats = {
        "train": stem_features(stem, "train", args.scenes),
        "val": stem_features(stem, "val", args.val_scenes),
    }
    train = questions(vocab, "train", args.scenes, types)
    val = questions(vocab, "val", args.val_scenes, types)[:1024]

    model = build_model("shapes", vocab_size=len(vocab), dropout=0.0)
    # the cached stem output stands in for the model's own ResNet
    model.encoder.embed_images = None
    model.encoder._image_features = lambda images, masks: [images]
    model.encoder.image_proj = torch.nn.Linear(feats["train"].shape[1], model.config.d_model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    rng, log, start = random.Random(0), [], time.time()
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / 100)
        src, img, dec, labels = batch(rng.sample(train, args.batch_size), feats["train"])
        logits, _ = model(src, dec, img)
        loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0:
            row = {"step": step, "samples": step * args.batch_size, "seconds": round(time.time() - start)}
            row.update(evaluate(model, val, feats["val"]))
            log.append(row)
            print(json.dumps(row), flush=True)
    report = {"types": sorted(types), "train_questions": len(train), "val_questions": len(val), "log": log}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
