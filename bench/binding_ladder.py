"""The binding ladder: does the model read what is in the image, from the easiest case up?

    python bench/binding_ladder.py --rungs color1 shape1 color2 vqa --arms ofa plain --steps 300 \
        --out bench/results/binding_ladder.json

Each rung is a question set on a fixed pool of rendered scenes: `color1` one object, "what color is
the star?"; `shape1` one object, "what shape is the red shape?"; `color2` / `shape2` up to two
objects, the object named by its other attributes or its place; `vqa` the full VQA mix on full scenes;
`ground1` / `ground2` the box of the named object; `exist1` one object, "is there a red shape?"
(yes / no); `itm1` / `itm2` / `itm` "does the image describe ...?" over true captions and hard
negatives one colour, shape or count away, on scenes of up to one, two or all objects; `itm1_vqa`
and `exist1_vqa` train on `color1` and `shape1` as well.
Each arm is a model trained end to end on it (stem included) with the recipe's optimiser (AdamW,
betas 0.9/0.98, decay 0.01, warmup, label smoothing 0.1, clipping 1.0):

* `ofa`: the project's model at `--size` (`--override key=value` sets OFAConfig fields);
* `plain`: a `torch.nn.Transformer` encoder-decoder (pre-LN, learned positions added to the tokens)
  fed the same stem's patches: the control.

Every `--eval-every` steps: teacher-forced exact-answer accuracy and loss on val with each scene's
own image and with another scene's (the gap is the image's share of the answer), plus, for `ofa`,
the position-bias scale per attention kind and the decoder's cross-attention entropy over patches.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ofa_unified.data import shapes
from ofa_unified.data.preprocess import image_to_tensor
from ofa_unified.diagnostics import cross_attention_entropy, position_bias_scale
from ofa_unified.model import OFAConfig, OFAModel, build_model, model_config
from ofa_unified.resnet import ResNet
from ofa_unified.tasks import get_task
from ofa_unified.vocab import BOS, EOS, PAD, Vocab

REPO = Path(__file__).resolve().parents[1]
IGNORE = -100
# rung -> (max objects per scene, task, question kinds or None for every record of the task)
RUNGS = {
    "color1": (1, "vqa", {"color"}),
    "shape1": (1, "vqa", {"shape"}),
    "color2": (2, "vqa", {"color"}),
    "shape2": (2, "vqa", {"shape"}),
    "vqa": (shapes.MAX_OBJECTS, "vqa", {"color", "shape", "count", "existence", "relation"}),
    "ground1": (1, "grounding", None),
    "ground2": (2, "grounding", None),
    "exist1": (1, "vqa", {"existence"}),
    "itm1": (1, "itm", None),
    "itm2": (2, "itm", None),
    "itm": (shapes.MAX_OBJECTS, "itm", None),
    "itm1_vqa": (1, "itm", None),
    "exist1_vqa": (1, "vqa", {"existence"}),
    "exist1_color": (1, "vqa", "exist_color"),
    "exist1_color_say": (1, "vqa", "exist_color_say"),
    "exist2": (2, "vqa", {"existence"}),
    "exist2_evidence": (2, "vqa", {"existence"}),
    "itm1_evidence": (1, "itm", None),
    "itm2_evidence": (2, "itm", None),
}
# Rungs whose targets carry the record's evidence before the verdict (OFAConfig.answer_evidence).
EVIDENCE = {"exist2_evidence", "itm1_evidence", "itm2_evidence"}
# Rungs trained on other rungs' questions as well (validated on their own): does reading colours and
# shapes out (VQA) give ITM the features it compares?
TRAIN_ALSO = {"itm1_vqa": ("color1", "shape1"), "exist1_vqa": ("color1", "shape1")}


def exist_color_records(scene: shapes.Scene, rng: random.Random, say: bool) -> list[dict]:
    """The smallest verification: "is there a <colour> shape?" once with the object's colour (yes) and
    once with another (no). `say`: the answer names the object's colour first ("green no"), so the
    yes / no step compares two words instead of a word with pixels."""
    color = scene.objects[0].color
    other = rng.choice([c for c in shapes.COLORS if c != color])
    return [
        {
            "question": f"is there {shapes.with_article(c + ' shape')}?",
            "answers": [f"{color} {a}" if say else a],
        }
        for c, a in ((color, "yes"), (other, "no"))
    ]


# A box coordinate counts as read when within this many bins (one bin per pixel at 128 px): a box of
# the smallest size (~16 px) off by 3 px on each side still overlaps its truth by IoU > 0.5.
BIN_TOLERANCE = 3


def question_set(
    vocab: Vocab, split: str, n: int, rung: str, size: int, prompt: bool = False
) -> tuple[torch.Tensor, list]:
    """Images [n, 3, size, size] and (scene index, source ids, answer ids, decoder prompt ids) of each
    wanted question. `prompt`: OFA's `prompt_type=prev_output`, the instruction (source minus bos and
    eos) forced as the decoder's prefix without loss, so the decoder's queries see the text."""
    max_objects, task_name, kinds = RUNGS[rung]
    task, images, items = get_task(task_name), [], []
    for i in range(n):
        image, scene = shapes.sample(split, i, size, max_objects)
        images.append(image_to_tensor(image))
        if isinstance(kinds, str):
            records = exist_color_records(scene, shapes.record_rng(scene.seed), kinds.endswith("say"))
        else:
            records = [
                r
                for r in shapes.scene_records(scene, shapes.record_rng(scene.seed), [task_name])
                if kinds is None or r["question_type"] in kinds
            ]
        for r in records:
            if rung not in EVIDENCE:
                r = {k: v for k, v in r.items() if k != "evidence"}
            target = task.target(r, image.size, vocab, random.Random(0))
            src = vocab.encode(task.source(r, image.size, vocab))
            items.append((i, src, vocab.encode(target, False, False), src[1:-1] if prompt else []))
    return torch.stack(images), items


def batch(items: list, images: torch.Tensor, roll: bool = False) -> tuple[torch.Tensor, ...]:
    n, src_len = len(items), max(len(x[1]) for x in items)
    tgt_len = max(len(x[3]) + len(x[2]) for x in items) + 1
    src = torch.full((n, src_len), PAD)
    dec = torch.full((n, tgt_len), PAD)
    labels = torch.full((n, tgt_len), IGNORE)
    for j, (_, s, t, p) in enumerate(items):
        src[j, : len(s)] = torch.tensor(s)
        dec[j, : len(p) + len(t) + 1] = torch.tensor([BOS, *p, *t])
        labels[j, len(p) : len(p) + len(t) + 1] = torch.tensor([*t, EOS])
    scenes = torch.tensor([x[0] for x in items])
    if roll:  # another scene's image: the next question's, skipping questions about the same scene
        other = scenes.roll(1)
        same = other.eq(scenes)
        other[same] = (scenes[same] + 1) % images.shape[0]
        scenes = other
    return src, images[scenes], dec, labels


class PlainSeq2Seq(nn.Module):
    """The control: `nn.Transformer` (pre-LN, GELU) with learned positions added to the tokens, the
    same ResNet stem, tied input/output embeddings. Same call as OFAModel: (src, dec, images)."""

    def __init__(self, cfg: OFAConfig, max_len: int = 512):
        super().__init__()
        d = cfg.d_model
        self.stem = ResNet(cfg.resnet_layers, cfg.resnet_width)
        self.image_proj = nn.Linear(self.stem.out_channels, d)
        self.embed = nn.Embedding(cfg.vocab_size, d, padding_idx=PAD)
        self.enc_pos = nn.Parameter(torch.randn(max_len, d) * 0.02)
        self.dec_pos = nn.Parameter(torch.randn(max_len, d) * 0.02)
        self.transformer = nn.Transformer(
            d,
            cfg.encoder_heads,
            cfg.encoder_layers,
            cfg.decoder_layers,
            cfg.encoder_ffn_dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, src: torch.Tensor, dec: torch.Tensor, images: torch.Tensor):
        patches = self.image_proj(self.stem(images).flatten(2).transpose(1, 2))
        x = torch.cat([patches, self.embed(src)], 1)
        x = x + self.enc_pos[: x.shape[1]]
        pad = torch.cat([src.new_zeros(src.shape[0], patches.shape[1]).bool(), src.eq(PAD)], 1)
        y = self.embed(dec) + self.dec_pos[: dec.shape[1]]
        causal = nn.Transformer.generate_square_subsequent_mask(dec.shape[1])
        h = self.transformer(
            x, y, tgt_mask=causal, src_key_padding_mask=pad, memory_key_padding_mask=pad, tgt_is_causal=True
        )
        return F.linear(h, self.embed.weight), None


def _freeze_zero(*modules: nn.Module) -> None:
    for m in modules:
        for p in m.parameters():
            nn.init.zeros_(p)
            p.requires_grad_(False)


def _torch_init(model: OFAModel) -> None:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()


# One change at a time to the `ofa` arm (`--ablate NAME ...`): OFAConfig options where the model has
# one, else a change made here.
ABLATIONS = {
    "no_abs_pos": {"abs_pos_bias": False},
    "no_cross_pos": {"cross_pos_bias": False},
    "no_normformer": {"normformer": False},
    "no_patch_ln": {"patch_layernorm": False},
    "scale_head_dim": {"attention_scale": "head_dim"},
    "no_rel_pos": lambda m: _freeze_zero(
        *m.encoder.token_rel_pos_table_list,
        *m.encoder.image_rel_pos_table_list,
        *m.decoder.token_rel_pos_table_list,
        *m.decoder.image_rel_pos_table_list,
    ),
    "torch_init": _torch_init,
}


def make_model(arm: str, size: str, vocab_size: int, overrides: dict, ablate: list[str] = ()) -> nn.Module:
    options = {
        k: v for name in ablate if isinstance(ABLATIONS[name], dict) for k, v in ABLATIONS[name].items()
    }
    cfg = model_config(size, vocab_size=vocab_size, dropout=0.0, **{**overrides, **options})
    if arm == "ofa":
        model = build_model(cfg)
        for name in ablate:
            if callable(ABLATIONS[name]):
                ABLATIONS[name](model)
        return model
    if arm == "plain":
        return PlainSeq2Seq(cfg)
    raise ValueError(f"unknown arm {arm!r}; expected ofa or plain")


@torch.no_grad()
def evaluate(model: nn.Module, val: list, images: torch.Tensor, bin_offset: int) -> dict:
    """Exact-answer accuracy and loss with own / swapped images; `*_near` also takes a box
    coordinate within BIN_TOLERANCE bins (ids from `bin_offset` on) as right; `*_last`: the answer's
    last token alone (the verdict of an answer written after its evidence, given the true evidence)."""
    model.eval()
    out: dict = {}
    for name, roll in (("own", False), ("swapped", True)):
        loss, tokens, correct, near, last = 0.0, 0, 0, 0, 0
        for start in range(0, len(val), 128):
            src, img, dec, labels = batch(val[start : start + 128], images, roll)
            logits, _ = model(src, dec, img)
            loss += F.cross_entropy(
                logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="sum"
            ).item()
            tokens += int(labels.ne(IGNORE).sum())
            pred, skip = logits.argmax(-1), labels.eq(IGNORE)
            correct += int((pred.eq(labels) | skip).all(1).sum())
            close = pred.ge(bin_offset) & labels.ge(bin_offset) & (pred - labels).abs().le(BIN_TOLERANCE)
            near += int((pred.eq(labels) | skip | close).all(1).sum())
            at = labels.ne(IGNORE).cumsum(1).argmax(1) - 1  # the last answer token, before eos
            rows = torch.arange(len(at))
            last += int(pred[rows, at].eq(labels[rows, at]).sum())
        out[f"{name}_loss"], out[f"{name}_acc"] = round(loss / tokens, 3), round(correct / len(val), 3)
        out[f"{name}_near"] = round(near / len(val), 3)
        out[f"{name}_last"] = round(last / len(val), 3)
    if isinstance(model, OFAModel):
        grid = images.shape[-1] // 16
        out["pos_bias_std"] = {k: round(v, 2) for k, v in position_bias_scale(model, grid).items()}
        src, img, dec, _ = batch(val[:64], images)
        ent = cross_attention_entropy(model, lambda: model(src, dec, img), grid * grid)
        out["cross_entropy_nats"] = [round(e, 2) for e in ent]
    model.train()
    return out


def train(
    model: nn.Module,
    data: tuple[torch.Tensor, list],
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    warmup: int = 50,
    seed: int = 0,
    every: int = 0,
    report=None,
) -> None:
    """The recipe's optimiser on one question set; `report(step)` runs every `every` steps and last."""
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in trained if p.dim() >= 2], "weight_decay": 0.01},
            {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.98),
    )
    images, items = data
    rng = random.Random(seed)
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / warmup)
        src, img, dec, labels = batch(rng.sample(items, batch_size), images)
        logits, _ = model(src, dec, img)
        loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        if report is not None and (step == steps or (every and step % every == 0)):
            report(step)


def run(arm: str, rung: str, args, vocab: Vocab, data: dict) -> dict:
    torch.manual_seed(args.seed)
    ablate = args.ablate if arm == "ofa" else []
    model = make_model(arm, args.size, len(vocab), args.override, ablate)
    val_images, val = data["val"]
    log, start = [], time.time()

    def report(step: int) -> None:
        row = {"step": step, "samples": step * args.batch_size, "seconds": round(time.time() - start)}
        row.update(evaluate(model, val, val_images, vocab.bin_offset))
        log.append(row)
        print(json.dumps({"arm": arm, "rung": rung, "ablate": ablate, **row}), flush=True)

    train(
        model,
        data["train"],
        args.steps,
        args.batch_size,
        args.lr,
        args.warmup,
        args.seed,
        args.eval_every,
        report,
    )
    return {"arm": arm, "rung": rung, "overrides": args.override, "ablate": ablate, "log": log}


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = json.loads(value) if value[:1] in "0123456789-[{tf" else value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rungs", nargs="+", default=["color1"], choices=sorted(RUNGS))
    parser.add_argument("--arms", nargs="+", default=["ofa", "plain"])
    parser.add_argument("--size", default="shapes")
    parser.add_argument("--override", nargs="*", default=[], help="OFAConfig key=value for both arms")
    parser.add_argument("--ablate", nargs="*", default=[], choices=sorted(ABLATIONS), help="for the ofa arm")
    parser.add_argument("--vocab", type=Path, default=REPO / "checkpoints" / "default")
    parser.add_argument("--scenes", type=int, default=3000, help="train scenes in the rendered pool")
    parser.add_argument("--val-scenes", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", action="store_true", help="instruction as the decoder's prefix")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.override = parse_overrides(args.override)
    torch.set_num_threads(args.threads)
    vocab = Vocab.load(args.vocab)
    results = []
    for rung in args.rungs:
        data = {
            "train": question_set(vocab, "train", args.scenes, rung, args.image_size, args.prompt),
            "val": question_set(vocab, "val", args.val_scenes, rung, args.image_size, args.prompt),
        }
        for other in TRAIN_ALSO.get(rung, ()):  # same scenes, so the images are the same pool
            also = question_set(vocab, "train", args.scenes, other, args.image_size, args.prompt)
            data["train"][1].extend(also[1])
        for arm in args.arms:
            results.append(run(arm, rung, args, vocab, data))
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                report = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": results}
                args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
