"""Multitask training recipe: one OFA-style model, every task an instruction, every answer tokens.

    python train/multitask.py                                    # shapes world, train/configs/shapes.py
    python train/multitask.py --config train/configs/micro.py    # tiny smoke run
    python train/multitask.py --out runs/x --max-steps 3000 --batch-size 32 --tasks caption=1,detection=2
    python train/multitask.py --init runs/shapes/model --data jsonl:my/train.jsonl --lr 1e-4 --out runs/ft
    torchrun --nproc_per_node 2 train/multitask.py ...           # DDP: gloo on CPU, nccl on GPU

Every TrainConfig field is a flag (`--warmup-steps 100`, `--model-overrides dropout=0.1`) or
`--set key=value`; `--config FILE` starts from another config file (a module defining `config`).
`--data SPEC[@WEIGHT]` (repeatable) replaces the sources: `shapes` or a reader spec
(`ofa_unified.data.readers.open_dataset`), e.g. `--data shapes --data jsonl:extra.jsonl@0.5`.

One readable file: setup (process group, vocabulary, VQ tokenizer, model, data, optimizer, resume)
-> train (gradient accumulation, clipping, warmup + decay, periodic eval and checkpoints) ->
save_checkpoint -> cleanup. out_dir holds:
  model/            the model as a project checkpoint (save_checkpoint; `vq/` inside when image
                    outputs are trained), loadable by `ofa_unified.load_checkpoint` and the Predictor
  train_state.pt    model weights, optimizer, scheduler, step, sampler position, RNG states (every
                    rank), config; written to a temp name and renamed, so it is always whole
  vocab/            the SentencePiece vocabulary built for this run (when none was given)
  metrics.jsonl     one line per log interval (loss, lr, tokens/s, ...) and per evaluation
A run with train_state.pt in out_dir resumes (resume="auto"): the data order is a function of the
sample index, so a killed and resumed run repeats an uninterrupted run's losses exactly.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import importlib.util
import json
import logging
import math
import os
import random
import re
import sys
import time
import types
import typing
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any

# The small CPUs this recipe is sized for are often shared. OpenMP threads that spin while a sibling
# thread is descheduled made training 5-10x slower on 2 busy cores (3 vs 30 samples/s measured);
# passive waiting costs next to nothing on an idle machine. Set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402
from tqdm import tqdm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ofa_unified.checkpoint import (  # noqa: E402
    load_checkpoint,
    load_stem,
    load_with_new_modules,
    save_checkpoint,
)
from ofa_unified.data.pipeline import (  # noqa: E402
    IGNORE_INDEX,
    IMAGE_OUTPUT_TASKS,
    Example,
    IndexSampler,
    Mixture,
    RecordsDataset,
    ShapesMultitask,
    build_shapes_vocab,
    collate,
    contrastive,
    split_by_output,
)
from ofa_unified.diagnostics import cross_attention_entropy, position_bias_scale, rolled  # noqa: E402
from ofa_unified.generate import generate  # noqa: E402
from ofa_unified.inference import VQ_DIR  # noqa: E402  (where the Predictor looks for a tokenizer)
from ofa_unified.model import PAD_ID, OFAModel, build_model, in_batch_recall, itc_loss  # noqa: E402
from ofa_unified.tasks import ParseError, evidence_constraint, get_task  # noqa: E402
from ofa_unified.vocab import CONFIG_FILE as VOCAB_CONFIG  # noqa: E402
from ofa_unified.vocab import Vocab  # noqa: E402
from ofa_unified.vq import CONFIG_NAME as VQ_CONFIG  # noqa: E402
from ofa_unified.vq import VQTokenizer, encoder_codes  # noqa: E402
from train.configs.shapes import TrainConfig  # noqa: E402

STATE_FILE, MODEL_DIR, VOCAB_DIR, METRICS_FILE = "train_state.pt", "model", "vocab", "metrics.jsonl"
DEFAULT_VQ = REPO / "checkpoints" / "vq"
# Fields that do not change what is computed: a resumed run may set them differently.
RUN_ONLY_FIELDS = (
    "resume",
    "stop_after",
    "time_limit",
    "num_workers",
    "progress",
    "log_interval",
    "save_interval",
    "eval_interval",
    "eval_samples",
    "eval_generate",
    "eval_data",
)
logger = logging.getLogger("multitask")


# ---------------------------------------------------------------------------------------------------
# Config: a file defining `config`, then flags / --set on top


def load_config(path: str | Path) -> TrainConfig:
    """Run a config file and return its `config` (a TrainConfig)."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"_train_config_{path.stem}", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise ValueError(f"config file {path} not found")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    cfg = getattr(module, "config", None)
    if not (dataclasses.is_dataclass(cfg) and type(cfg).__name__ == "TrainConfig"):
        raise ValueError(f"{path} must define `config = TrainConfig(...)`")
    # Executing train/configs/shapes.py itself defines a second TrainConfig class: copy into ours.
    return TrainConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})


def _convert(hint: Any, text: str) -> Any:
    """Read a command-line string as a value of the field's annotated type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if text.strip().lower() in ("none", "null"):
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _convert(hint, text)
    if hint is bool:
        value = text.strip().lower()
        if value not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise ValueError("expected true or false")
        return value in ("true", "1", "yes", "on")
    if hint in (int, float, str):
        return hint(text)
    if origin is tuple:
        parts = text.split(",")
        if len(parts) != len(args):
            raise ValueError(f"expected {len(args)} comma-separated values")
        return tuple(_convert(a, p) for a, p in zip(args, parts, strict=True))
    if origin is dict:
        out = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"expected key=value items, got {item!r}")
            out[key.strip()] = _literal(value) if args[1] is Any else _convert(args[1], value)
        return out
    raise ValueError(f"cannot read a {hint} from the command line")


def _literal(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_data(entries: list[str]) -> dict[str, float]:
    """`SPEC[@WEIGHT]` entries (also `;`-separated) -> {spec: weight}."""
    out: dict[str, float] = {}
    for entry in (e.strip() for text in entries for e in text.split(";")):
        if entry:
            spec, _, weight = entry.rpartition("@") if "@" in entry else (entry, "", "1")
            out[spec] = float(weight)
    if not out:
        raise ValueError("no data source given")
    return out


def apply_overrides(cfg: TrainConfig, updates: dict[str, Any]) -> TrainConfig:
    """`cfg` with fields replaced; strings are parsed by the field's type."""
    hints = typing.get_type_hints(TrainConfig)
    unknown = sorted(set(updates) - set(hints))
    if unknown:
        raise ValueError(f"unknown config fields {unknown}; fields: {', '.join(hints)}")
    values = {}
    for name, value in updates.items():
        try:
            if name == "data":
                values[name] = parse_data(value if isinstance(value, list) else [value])
            elif isinstance(value, str):
                values[name] = _convert(hints[name], value)
            else:
                values[name] = value
        except (ValueError, TypeError) as e:
            raise ValueError(f"{name}={value!r}: {e}") from None
    cfg = dataclasses.replace(cfg, **values)
    check_config(cfg)
    return cfg


def check_config(cfg: TrainConfig) -> None:
    rules = [
        ("schedule", cfg.schedule in ("cosine", "linear"), "'cosine' or 'linear'"),
        ("precision", cfg.precision in ("auto", "fp32", "bf16"), "'auto', 'fp32' or 'bf16'"),
        ("resume", cfg.resume in ("auto", "yes", "no"), "'auto', 'yes' or 'no'"),
        ("max_steps", cfg.max_steps >= 1, ">= 1"),
        ("batch_size", cfg.batch_size >= 1, ">= 1"),
        ("grad_accum", cfg.grad_accum >= 1, ">= 1"),
        ("lr", cfg.lr > 0, "> 0"),
        ("warmup_steps", cfg.warmup_steps >= 0, ">= 0"),
        ("min_lr_ratio", 0 <= cfg.min_lr_ratio <= 1, "in [0, 1]"),
        ("label_smoothing", 0 <= cfg.label_smoothing < 1, "in [0, 1)"),
        ("loss_normalization", cfg.loss_normalization in ("token", "sample"), "'token' or 'sample'"),
        ("num_workers", cfg.num_workers >= 0, ">= 0"),
        ("tasks", any(w > 0 for w in cfg.tasks.values()), "a mix with a positive weight"),
        ("data", bool(cfg.data) and all(w >= 0 for w in cfg.data.values()), "sources with weights >= 0"),
    ]
    for name, ok, rule in rules:
        if not ok:
            raise ValueError(f"config {name} must be {rule}, got {getattr(cfg, name)!r}")
    if cfg.train_only is not None:
        try:
            re.compile(cfg.train_only)
        except re.error as e:
            raise ValueError(
                f"config train_only must be a regular expression, got {cfg.train_only!r}: {e}"
            ) from None
    for name, weight in cfg.tasks.items():
        get_task(name)  # UnknownTaskError names the known tasks
        if weight < 0:
            raise ValueError(f"task weight of {name} must be >= 0, got {weight}")


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Config file (default train/configs/shapes.py) + one flag per field + `--set key=value`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a config file defining `config = TrainConfig(...)`")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any field, repeatable")
    p.add_argument(
        "--resume",
        dest="resume",
        action="store_const",
        const="yes",
        default=argparse.SUPPRESS,
        help="continue from OUT/train_state.pt (default: when it exists)",
    )
    p.add_argument(
        "--no-resume",
        dest="resume",
        action="store_const",
        const="no",
        default=argparse.SUPPRESS,
        help="start over in OUT",
    )
    p.add_argument(
        "--data",
        action="append",
        default=argparse.SUPPRESS,
        metavar="SPEC[@WEIGHT]",
        help="data source, repeatable: 'shapes' or a reader spec (replaces the config's)",
    )
    aliases = {"out_dir": ["--out"], "warmup_steps": ["--warmup"]}
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("resume", "data"):
            continue
        flags = ["--" + f.name.replace("_", "-"), *aliases.get(f.name, [])]
        if isinstance(f.default, bool):
            p.add_argument(
                *flags, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS
            )
        else:
            p.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, metavar="VALUE")
    args = vars(p.parse_args(argv))
    try:
        cfg = load_config(args.pop("config")) if args.get("config") else TrainConfig()
        updates = {k: v for k, v in args.items() if k not in ("config", "set")}
        for item in args["set"]:
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
            updates[key.strip().replace("-", "_")] = value
        return apply_overrides(cfg, updates)
    except ValueError as e:
        p.error(str(e))


# ---------------------------------------------------------------------------------------------------
# Small helpers


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine or linear decay to min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def rng_state() -> dict:
    """Python, numpy and torch RNG states, as tensors and plain values (loadable with weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _materialise(dataset) -> list[Example]:
    return [dataset[i] for i in range(len(dataset))]


def sample_means(per_token: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] each sample's mean over its labelled tokens of a [B, T] loss (0 at ignored positions)."""
    tokens = labels.ne(IGNORE_INDEX).sum(1).clamp(min=1).to(per_token.device)
    return per_token.sum(1) / tokens


def count_tokens(batch: dict) -> int:
    return int(batch["input_ids"].ne(PAD_ID).sum() + batch["labels"].ne(IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------------------------------
# The recipe


class MultitaskRecipe:
    """setup() -> train() -> cleanup(); save_checkpoint() and evaluate() run inside train()."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.losses: list[float] = []  # per optimizer step of this invocation
        self.last_metrics: dict[str, float] = {}

    # -- setup -------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        self._setup_distributed()
        if cfg.threads > 0 and self.device.type == "cpu":
            torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.out_dir)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        state = self._find_state()
        random.seed(cfg.seed + self.rank)
        np.random.seed(cfg.seed + self.rank)
        torch.manual_seed(cfg.seed + self.rank)

        self.vq = self._load_vq()
        self.vocab, model = self._build_model()
        self._prepare_stem(model, fresh=state is None)
        self.tasks = self._task_mix()
        self.model = model.to(self.device)
        mc = self.model.config
        self.image_size = mc.patch_image_size
        self.code_image_size = mc.code_grid_size * self.vq.config.downsample if self.vq is not None else None
        # an image_tokens model reads every image's codes: a copy of the tokenizer on the model's device
        self.input_vq = copy.deepcopy(self.vq).to(self.device).eval() if mc.image_tokens and self.vq else None
        if mc.image_tokens and self.vq is None:
            raise ValueError("model option image_tokens reads images as VQ codes: give a tokenizer, --vq DIR")
        self.prompt = mc.prompt_type == "prev_output"
        self.evidence = mc.answer_evidence
        pairs = [t for t in self.tasks if contrastive(t)]
        if pairs and not self.model.has_retrieval:
            raise ValueError(f"tasks {pairs} train a retrieval head: give the model one (itc_dim=128)")
        if pairs and self.world_size > 1:
            raise ValueError(f"tasks {pairs} run OFAModel.embed, outside DDP's forward: train on one process")
        self.train_data = self._train_data()
        if self.is_main:
            val, self.generate_sets = self._eval_sets()
            self.val_pairs = [e for e in val if contrastive(e.task)]
            self.val_examples = [e for e in val if not contrastive(e.task)]

        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=cfg.betas,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.step = 0
        self.next_batch = 0  # the sampler position: micro-batches this rank has consumed
        if state is not None:
            self._restore(state)
        elif self.is_main:
            (self.out / METRICS_FILE).write_text("")
        self.ddp = None
        if self.world_size > 1:
            self.ddp = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,  # image-code layers sit idle in batches without code outputs
            )
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        if self.is_main:
            n = self.model.num_parameters()
            logger.info("model %s: %.2fM parameters, vocab %r", cfg.init or cfg.model, n / 1e6, self.vocab)
            if cfg.train_only is not None:
                trained = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
                logger.info("training %.2fM of them (train_only %r)", trained / 1e6, cfg.train_only)
            logger.info(
                "tasks %s; data %s; device %s x%d", self.tasks, cfg.data, self.device, self.world_size
            )

    def _setup_distributed(self) -> None:
        """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is one process."""
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = self.cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":  # set_device needs an index, also for a single process
            device = f"cuda:{local_rank}"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world_size > 1:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.is_main = self.rank == 0

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _find_state(self) -> dict | None:
        path = self.out / STATE_FILE
        if self.cfg.resume == "no" or (self.cfg.resume == "auto" and not path.exists()):
            return None
        if not path.exists():
            raise FileNotFoundError(f"--resume: {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved, now = state["config"], dataclasses.asdict(self.cfg)
        changed = sorted(k for k in now if k in saved and saved[k] != now[k] and k not in RUN_ONLY_FIELDS)
        if changed and self.is_main:
            logger.warning(
                "resuming with changed config fields %s: the run will not repeat the original", changed
            )
        return state

    def _load_vq(self) -> VQTokenizer | None:
        path = self.cfg.vq
        if path == "auto":
            path = DEFAULT_VQ if (DEFAULT_VQ / VQ_CONFIG).exists() else None
        if path is None:
            return None
        if not (Path(path) / VQ_CONFIG).exists():
            raise FileNotFoundError(
                f"vq: {path} holds no VQ tokenizer ({VQ_CONFIG}); train one with "
                "train/vq_tokenizer.py or pass --vq none"
            )
        return VQTokenizer.load(path).eval()

    def _build_model(self) -> tuple[Vocab, OFAModel]:
        cfg = self.cfg
        if cfg.init:
            loaded = load_checkpoint(cfg.init)
            model = OFAModel(dataclasses.replace(loaded.model.config, **cfg.model_overrides))
            load_with_new_modules(model, loaded.model.state_dict(), cfg.init)
            if self.is_main:
                logger.info(
                    "fine-tuning %s (%s format); its vocabulary and architecture replace model=%s",
                    cfg.init,
                    loaded.format,
                    cfg.model,
                )
            return loaded.vocab, model
        vocab = self._vocab()
        return vocab, build_model(cfg.model, **{**cfg.model_overrides, "vocab_size": len(vocab)})

    def _prepare_stem(self, model: OFAModel, fresh: bool) -> None:
        """Load the pretrained stem (fresh runs only: a resumed state holds it) and freeze what the
        config fixes (`freeze_stem`, `train_only`)."""
        cfg, stem = self.cfg, model.encoder.embed_images
        if cfg.stem and fresh:
            meta = load_stem(stem, cfg.stem)
            if self.is_main:
                logger.info("image stem from %s (pretrained: %s)", cfg.stem, meta.get("val"))
        if cfg.train_only is not None:
            pattern = re.compile(cfg.train_only)
            for name, p in model.named_parameters():
                p.requires_grad_(bool(pattern.search(name)))
            if not any(p.requires_grad for p in model.parameters()):
                raise ValueError(f"train_only {cfg.train_only!r} matches no parameter of the model")
        if cfg.freeze_stem:
            stem.requires_grad_(False)
        self.stem_fixed = not any(p.requires_grad for p in stem.parameters())

    def _train_mode(self) -> None:
        """model.train(), except that a frozen stem keeps evaluating with its stored BatchNorm statistics."""
        self.model.train()
        if self.stem_fixed:
            self.model.encoder.embed_images.eval()

    def _vocab(self) -> Vocab:
        """The given vocabulary, or this run's shapes-world SentencePiece (built once, then reused)."""
        cfg = self.cfg
        if cfg.vocab:
            return Vocab.load(cfg.vocab)
        directory = self.out / VOCAB_DIR
        if not (directory / VOCAB_CONFIG).exists():
            if self.is_main:
                num_codes = self.vq.config.codebook_size if self.vq is not None else cfg.num_codes
                logger.info(
                    "training a %d-piece SentencePiece on %d shapes scenes", cfg.vocab_size, cfg.vocab_scenes
                )
                build_shapes_vocab(directory, cfg.vocab_size, num_codes, cfg.num_bins, cfg.vocab_scenes)
            self._barrier()
        return Vocab.load(directory)

    def _task_mix(self) -> dict[str, float]:
        tasks = {k: w for k, w in self.cfg.tasks.items() if w > 0}
        image = [t for t in tasks if t in IMAGE_OUTPUT_TASKS]
        if image:
            reason = None
            if self.vq is None:
                reason = "no VQ tokenizer (train one: python train/vq_tokenizer.py --out checkpoints/vq)"
            elif self.vq.config.codebook_size > self.vocab.num_codes:
                reason = (
                    f"the VQ has {self.vq.config.codebook_size} codes, the vocabulary {self.vocab.num_codes}"
                )
            if reason:
                if self.is_main:
                    logger.warning("dropping image-output tasks %s from the mix: %s", image, reason)
                tasks = {k: w for k, w in tasks.items() if k not in image}
        if not tasks:
            raise ValueError("no task left to train")
        return tasks

    def _dataset_kwargs(self) -> dict:
        return dict(
            vocab=self.vocab,
            image_size=self.image_size,
            seed=self.cfg.seed,
            vq=self.vq,
            code_image_size=self.code_image_size,
            evidence=self.evidence,
        )

    def _train_data(self):
        cfg, sources = self.cfg, []
        for spec, weight in cfg.data.items():
            if spec == "shapes":
                ds = ShapesMultitask(
                    "train",
                    self.tasks,
                    num_scenes=cfg.train_scenes,
                    scene_size=cfg.scene_size,
                    augment=cfg.augment,
                    **self._dataset_kwargs(),
                )
            else:
                ds = RecordsDataset(
                    spec, tasks=list(self.tasks), augment=cfg.augment, **self._dataset_kwargs()
                )
            sources.append((ds, weight))
        return sources[0][0] if len(sources) == 1 else Mixture(sources, cfg.seed)

    def _eval_data(self, tasks: dict[str, float], n: int):
        if self.cfg.eval_data == "shapes":
            return ShapesMultitask(
                "val", tasks, length=n, scene_size=self.cfg.scene_size, **self._dataset_kwargs()
            )
        ds = RecordsDataset(self.cfg.eval_data, tasks=list(tasks), **self._dataset_kwargs())
        return Subset(ds, range(min(n, len(ds))))

    def _eval_sets(self) -> tuple[list[Example], dict[str, list[Example]]]:
        """Built once: the validation-loss examples and, per task, the greedy-decoding examples."""
        cfg = self.cfg
        val = _materialise(self._eval_data(self.tasks, cfg.eval_samples)) if cfg.eval_samples else []
        sets = {}
        for task in [t for t in self.tasks if not contrastive(t)] if cfg.eval_generate else ():
            try:
                sets[task] = _materialise(self._eval_data({task: 1.0}, cfg.eval_generate))
            except ValueError as e:  # an eval source without this task
                logger.warning("no greedy eval for %s: %s", task, e)
        return val, sets

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.next_batch = state["step"], state["next_batch"]
        if len(state["rng"]) == self.world_size:
            set_rng_state(state["rng"][self.rank])
        elif self.is_main:
            logger.warning(
                "saved with %d processes, resuming with %d: RNG streams restart from the seed",
                len(state["rng"]),
                self.world_size,
            )
        if self.is_main:
            path = self.out / METRICS_FILE  # drop lines logged after the checkpoint (they will be redone)
            lines = path.read_text().splitlines() if path.exists() else []
            path.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= self.step))
            logger.info("resumed from %s at step %d", self.out / STATE_FILE, self.step)

    # -- train -------------------------------------------------------------------------------------

    def autocast(self) -> torch.autocast:
        """bf16 autocast on CUDA (or when asked for); a no-op in fp32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def image_codes(self, images: torch.Tensor, code_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The images' VQ code ids when the model reads them (`image_tokens`), else None."""
        return encoder_codes(self.model.config, self.input_vq, self.vocab, images, code_mask)

    def loss(self, model, batch: dict, label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
        """Token cross-entropy of a collated batch; reduction "none" gives [B, T] with 0 at padding."""
        b = to_device(batch, self.device)
        code_mask = b["code_mask"] if bool(b["code_mask"].any()) else None
        with self.autocast():
            logits, _ = model(
                b["input_ids"],
                b["decoder_input_ids"],
                b["patch_images"],
                b["patch_masks"],
                code_mask,
                self.image_codes(b["patch_images"], code_mask),
            )
        return F.cross_entropy(
            logits.float().transpose(1, 2),
            b["labels"],
            ignore_index=IGNORE_INDEX,
            label_smoothing=label_smoothing,
            reduction=reduction,
        )

    def batch_loss(self, model, part: dict, num_labels: int, num_samples: int) -> torch.Tensor:
        """`part`'s share of its micro-batch's training loss: the token mean over the whole micro-batch
        (`num_labels` tokens), or with `loss_normalization="sample"` the mean over its `num_samples`
        samples of each sample's token mean, whichever part a token or sample is in."""
        cfg = self.cfg
        if cfg.loss_normalization == "token":
            return self.loss(model, part, cfg.label_smoothing, reduction="sum") / num_labels
        per_token = self.loss(model, part, cfg.label_smoothing, reduction="none")
        return sample_means(per_token, part["labels"]).sum() / num_samples

    def pair_loss(self, model: OFAModel, part: dict) -> tuple[torch.Tensor, float]:
        """The contrastive loss (`itc_loss`) of a batch of image-text pairs, each side embedded alone
        (`OFAModel.embed`), and its in-batch recall@1. It joins the micro-batch's token loss with
        weight 1 (VLMo, ALBEF): the pairs' share of the mix sets how many negatives it sees."""
        b = to_device(part, self.device)
        with self.autocast():
            images = model.embed(
                patch_images=b["patch_images"],
                patch_masks=b["patch_masks"],
                image_codes=self.image_codes(b["patch_images"], None),
            )
            texts = model.embed(input_ids=b["input_ids"])
        images, texts = images.float(), texts.float()
        return itc_loss(images, texts, model.itc_scale()), in_batch_recall(images, texts)

    def _loader(self) -> DataLoader:
        cfg = self.cfg
        sampler = IndexSampler(cfg.batch_size, self.next_batch, self.rank, self.world_size)
        return DataLoader(
            self.train_data,
            batch_sampler=sampler,
            collate_fn=functools.partial(collate, prompt=self.prompt),
            num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator(),  # keeps the loader from drawing on the global torch RNG
        )

    def _train_step(self, batches) -> dict[str, float]:
        cfg, model = self.cfg, self.ddp or self.model
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, tokens, samples, pair_sum, pair_parts = 0.0, 0, 0, 0.0, 0
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            self.next_batch += 1
            num_labels = int(batch["labels"].ne(IGNORE_INDEX).sum())
            parts = split_by_output(batch)
            for j, part in enumerate(parts):
                sync = self.ddp is None or (micro == cfg.grad_accum - 1 and j == len(parts) - 1)
                with nullcontext() if sync else self.ddp.no_sync():
                    if contrastive(part["tasks"][0]):
                        loss, _ = self.pair_loss(model, part)
                        pair_sum, pair_parts = pair_sum + loss.item(), pair_parts + 1
                    else:
                        loss = self.batch_loss(model, part, num_labels, len(batch["tasks"]))
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.item()
            tokens += count_tokens(batch)
            samples += len(batch["tasks"])
        grad_norm = 0.0
        if cfg.clip_grad > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        stats = torch.tensor([loss_sum / cfg.grad_accum, tokens, samples], dtype=torch.float64)
        if self.world_size > 1:
            stats = stats.to(self.device)
            dist.all_reduce(stats)
            stats[0] /= self.world_size
        loss, tokens, samples = stats.tolist()
        return {
            "loss": loss,
            "tokens": tokens,
            "samples": samples,
            "grad_norm": grad_norm,
            "lr": lr,
            "itc_loss": pair_sum,
            "itc_parts": pair_parts,
        }

    def train(self) -> None:
        cfg = self.cfg
        last = min(cfg.max_steps, cfg.stop_after) if cfg.stop_after else cfg.max_steps
        if self.step >= last and self.is_main:
            logger.info("%s is already at step %d of %d: nothing to train", self.out, self.step, last)
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.is_main and cfg.progress),
        )
        batches = iter(self._loader())
        self._train_mode()
        window: dict[str, float] = defaultdict(float)
        tick = started = time.perf_counter()
        while self.step < last:
            stats = self._train_step(batches)
            self.step += 1
            self.losses.append(stats["loss"])
            lr = stats.pop("lr")
            for k, v in stats.items():
                window[k] += v
            window["steps"] += 1
            elapsed = time.perf_counter() - tick
            bar.update(1)
            bar.set_postfix(
                loss=f"{stats['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{window['tokens'] / elapsed:.0f}"
            )
            if self.step % cfg.log_interval == 0 or self.step == last:
                record = {
                    "step": self.step,
                    "loss": window["loss"] / window["steps"],
                    "lr": lr,
                    "grad_norm": window["grad_norm"] / window["steps"],
                    "tokens_per_s": window["tokens"] / elapsed,
                    "samples_per_s": window["samples"] / elapsed,
                }
                if window["itc_parts"]:  # the contrastive part of `loss`, per micro-batch with pairs
                    record["train/itc_loss"] = window["itc_loss"] / window["itc_parts"]
                self._log(record)
                window.clear()
                tick = time.perf_counter()
            done = self.step == cfg.max_steps or self._out_of_time(started)
            # save before evaluating: an evaluation that fails must not cost the trained weights
            if done or self.step == last or (cfg.save_interval and self.step % cfg.save_interval == 0):
                self.save_checkpoint()
            if done or (cfg.eval_interval and self.step % cfg.eval_interval == 0):
                self.evaluate()
                if self.last_metrics:
                    bar.write(
                        f"step {self.step}: " + " ".join(f"{k}={v:.4g}" for k, v in self.last_metrics.items())
                    )
                tick = time.perf_counter()  # evaluation time is not training throughput
            if done:
                break
        bar.close()

    def _out_of_time(self, started: float) -> bool:
        """Whether `time_limit` minutes of training have passed (every rank decides alike)."""
        if not self.cfg.time_limit:
            return False
        late = torch.tensor(float(time.perf_counter() - started > 60 * self.cfg.time_limit))
        if self.world_size > 1:
            late = late.to(self.device)
            dist.all_reduce(late, op=dist.ReduceOp.MAX)
        if late.item() and self.is_main:
            logger.warning("time limit of %g minutes reached at step %d", self.cfg.time_limit, self.step)
        return bool(late.item())

    def _log(self, record: dict) -> None:
        if self.is_main:
            with open(self.out / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- evaluation --------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (plain cross-entropy, per task too) and greedy-decoding metrics, on rank 0."""
        metrics: dict[str, float] = {}
        if self.is_main:
            model = self.model
            model.eval()
            if self.val_examples:
                metrics.update(self._val_loss(model))
            if self.val_pairs:
                metrics.update(self._val_pairs(model))
            for task, examples in self.generate_sets.items():
                metrics.update(self._greedy(model, task, examples))
            self._train_mode()
            if metrics:
                self._log({"step": self.step, **metrics})
        self._barrier()
        self.last_metrics = metrics
        return metrics

    def _val_loss(self, model) -> dict[str, float]:
        """Validation loss per task, and its image gap: the loss with each sample shown another
        sample's image minus the loss with its own (`val_gap/<task>`, nats per token). A task whose
        answers come from the text alone has no gap, so a run that ignores the image shows at its
        first evaluation. Beside it: the position-bias scale per attention kind and the decoder's
        cross-attention entropy over the patches (`ofa_unified.diagnostics`)."""
        total, count = defaultdict(float), defaultdict(int)
        bs, entropies = self.cfg.batch_size, []
        for i in range(0, len(self.val_examples), bs):
            for batch in split_by_output(collate(self.val_examples[i : i + bs], prompt=self.prompt)):
                counts = batch["labels"].ne(IGNORE_INDEX).sum(1).tolist()
                for name, shown in (("val_loss", batch), ("val_swapped", rolled(batch))):
                    per_token = self.loss(model, shown, reduction="none").sum(1).tolist()
                    for task, loss, n in zip(batch["tasks"], per_token, counts, strict=True):
                        for key in (name, f"{name}/{task}"):
                            total[key] += loss
                            count[key] += n
                if not bool(batch["code_mask"].any()) and batch["patch_masks"].all():
                    b = to_device(batch, self.device)
                    entropies.append(
                        cross_attention_entropy(
                            model,
                            lambda b=b: self.loss(model, b),
                            (b["patch_images"].shape[-1] // 16) ** 2,
                        )
                    )
        out = {k: total[k] / count[k] for k in sorted(total) if not k.startswith("val_swapped")}
        for key in [k for k in out if k.startswith("val_loss/")]:
            task = key.split("/", 1)[1]
            out[f"val_gap/{task}"] = total[f"val_swapped/{task}"] / count[key] - out[key]
        for kind, std in position_bias_scale(self.model, self.image_size // 16).items():
            out[f"pos_bias_std/{kind}"] = std
        for layer, values in enumerate(zip(*entropies, strict=True)):
            out[f"cross_entropy/layer{layer}"] = sum(values) / len(values)
        return out

    def _val_pairs(self, model) -> dict[str, float]:
        """Contrastive loss and in-batch recall@1 of the validation pairs, in batches of batch_size
        (chance recall: 1 / batch), averaged over pairs."""
        loss = recall = 0.0
        bs, pairs = self.cfg.batch_size, self.val_pairs
        for i in range(0, len(pairs), bs):
            chunk = pairs[i : i + bs]
            batch_loss, batch_recall = self.pair_loss(model, collate(chunk))
            loss, recall = loss + batch_loss.item() * len(chunk), recall + batch_recall * len(chunk)
        return {"val_loss/itc": loss / len(pairs), "itc/recall@1": recall / len(pairs)}

    def _greedy(self, model, name: str, examples: list[Example]) -> dict[str, float]:
        """Greedy decoding under the task's constraint, parsed and scored by the task definition."""
        task, vocab = get_task(name), self.vocab
        batch = to_device(collate(examples), self.device)
        records, sizes = batch["records"], batch["sizes"]
        code_mask = batch["code_mask"] if bool(batch["code_mask"].any()) else None
        with self.autocast():
            enc = model.encode(
                batch["input_ids"],
                batch["patch_images"],
                batch["patch_masks"],
                code_mask,
                self.image_codes(batch["patch_images"], code_mask),
            )
            config = task.generation_config(records[0], beam_size=1, do_sample=False)
            prefix = [e.source_ids[1:-1] for e in examples] if self.prompt else None
            constraints = [task.constraint(vocab, r) for r in records]
            if self.evidence:
                constraints = [evidence_constraint(vocab, c) for c in constraints]
            hyps = generate(model, enc, config, constraints, prefix)
        predictions = []
        for hyp, record, size in zip(hyps, records, sizes, strict=True):
            try:
                predictions.append(task.parse(hyp[0].tokens, vocab, size, record))
            except ParseError:
                predictions.append(None)
        metrics = {f"{name}/parsed": sum(p is not None for p in predictions) / len(predictions)}
        try:
            metrics.update({f"{name}/{k}": v for k, v in task.evaluate(predictions, records).items()})
        except (ValueError, RuntimeError, OSError) as e:  # e.g. no Java for the PTB tokenizer
            logger.warning("%s metrics failed: %s", name, e)
        return metrics

    # -- checkpoints -------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Model directory (atomic, via save_checkpoint) and train_state.pt (temp file, then rename)."""
        cfg = self.cfg
        rng = [rng_state()]
        if self.world_size > 1:
            rng = [None] * self.world_size
            dist.all_gather_object(rng, rng_state())
        if self.is_main:
            config = dataclasses.asdict(cfg)
            directory = save_checkpoint(
                self.model,
                self.vocab,
                self.out / MODEL_DIR,
                extra={"step": self.step, "train_config": config},
            )
            if self.vq is not None and (
                self.model.config.image_tokens or any(t in IMAGE_OUTPUT_TASKS for t in self.tasks)
            ):
                self.vq.save(directory / VQ_DIR)
            state = {
                "step": self.step,
                "next_batch": self.next_batch,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng,
                "config": config,
                "world_size": self.world_size,
            }
            tmp = self.out / f"{STATE_FILE}.tmp"
            torch.save(state, tmp)
            os.replace(tmp, self.out / STATE_FILE)
        self._barrier()

    def cleanup(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    """Train with the config from `argv` (None: sys.argv). Returns this invocation's per-step losses,
    the final step and the last evaluation's metrics."""
    cfg = parse_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recipe = MultitaskRecipe(cfg)
    try:
        recipe.setup()
        recipe.train()
    finally:
        recipe.cleanup()
    return {"step": recipe.step, "losses": recipe.losses, "metrics": recipe.last_metrics}


if __name__ == "__main__":
    main()
