"""The one place that turns `(PIL image, record)` into model tensors, for training and evaluation.

`build_example` asks the task definition (`tasks.get_task`) for the instruction and the target, so
a template lives in one place; `collate` pads a list of examples into the batch `OFAModel.forward`
takes plus `labels`. Boxes are quantised relative to the ORIGINAL image size (W, H): OFA stretches
the image to a square, so a bin is a fraction of W or H whatever the input resolution.

Image outputs need the VQ tokenizer (`ofa_unified.vq`):
* image_infilling: the encoder sees the image with its middle blanked (`mask_middle`); the target
  is the codes of the middle crop of the same model-input image;
* text_to_image: the encoder sees no image (a blank one with patch_mask False, so batches stay
  rectangular); the target is the codes of the whole image resized to `image_size` px (the recipe
  passes `code_grid_size * vq downsample`, so the code grid fits the decoder's position table).
  A record with `text_only` (prefix_lm's text-only case) gets the same blank image.

Contrastive pairs (task `itc`, output "embedding") have no target: their labels are all ignored and
`split_by_output` hands them to the trainer as a batch of their own, for `model.itc_loss`.
A record that already holds `target_codes` needs no tokenizer. VQ encoding runs inside
`build_example`, i.e. in the DataLoader workers, with the (small) tokenizer on CPU: each worker
encodes its own samples with one thread while the main process trains, and the main process never
waits for a separate encoding pass.

Datasets are map-style and deterministic: item i depends only on (seed, i), so a sampler's state
is "the next index" and resuming is exact (`IndexSampler`). `ShapesMultitask` draws item i's task
by weight and renders scene i of a shapes-world split; `RecordsDataset` wraps a real-format reader
(`readers.open_dataset`); `Mixture` mixes sources by weight.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ofa_unified.data import shapes
from ofa_unified.data.preprocess import ImageTransform
from ofa_unified.data.readers import BOX_TOLERANCE, DataError, open_dataset, validate_record
from ofa_unified.tasks import get_task, load_templates
from ofa_unified.vocab import BOS, EOS, PAD, Vocab, train_sentencepiece
from ofa_unified.vq import block_mask, crop_middle, pil_to_tensor

IGNORE_INDEX = -100  # labels at padded positions (F.cross_entropy's ignore_index)
IMAGE_OUTPUT_TASKS = ("image_infilling", "text_to_image", "masked_image_modeling")
MIM_RATIO = 0.4  # share of the code grid masked for masked_image_modeling (BEiT: ~40%)


class RecordError(ValueError):
    """A record that cannot become an example; the message names the record and what is wrong."""


@dataclass
class Example:
    """One sample as ids and pixels. `record` is the record the ids came from (with `target_codes`
    filled in for image outputs) and `size` the original image's (W, H), for parsing and metrics."""

    source_ids: list[int]  # bos + instruction + eos
    target_ids: list[int]  # the answer, without bos/eos
    image: torch.Tensor  # [3, S, S], normalised to [-1, 1]
    has_image: bool  # False: a blank image the encoder masks out (text_to_image)
    code_output: bool  # the decoder writes image codes (the model's code_mask)
    loss_positions: list[int] | None  # target positions with loss (masked image modeling); None: all
    task: str
    record: dict = field(repr=False)
    size: tuple[int, int] = (0, 0)


def require_vq(tasks: Sequence[str], vq: Any) -> None:
    """Fail at configuration time, not on the first image-output sample, when no tokenizer is given."""
    need = [t for t in tasks if t in IMAGE_OUTPUT_TASKS]
    if need and vq is None:
        raise ValueError(
            f"tasks {need} write image codes and need a VQ tokenizer (train one with "
            "`python train/vq_tokenizer.py --out checkpoints/vq`), or leave them out of the task mix"
        )


def record_name(record: Mapping[str, Any]) -> str:
    return str(record.get("id", "<no id>"))


def build_example(
    image: Image.Image,
    record: Mapping[str, Any],
    vocab: Vocab,
    transform: ImageTransform,
    rng: random.Random,
    vq: Any = None,
    image_size: int | None = None,
    evidence: bool = False,
) -> Example:
    """Ids and pixels of one `(image, record)`; RecordError names the record id and the problem.

    `rng` picks among reference answers and drives photometric jitter; `image_size` is the side at
    which text_to_image targets are tokenized (default: the transform's size). `evidence`: a record's
    "evidence" goes into its target before the answer (models with OFAConfig.answer_evidence);
    otherwise it is ignored.
    """
    if not isinstance(record, Mapping):
        raise RecordError(f"a record must be a mapping, got {type(record).__name__}")
    try:
        task = get_task(record.get("task"))
    except ValueError as e:
        raise RecordError(f"record {record_name(record)}: {e}") from None
    fields = dict(record)
    if not evidence:
        fields.pop("evidence", None)
    try:
        return _build(task, image, fields, vocab, transform, rng, vq, image_size)
    except (ValueError, KeyError, TypeError) as e:
        raise RecordError(f"record {record_name(record)} ({task.name}): {e}") from e


def _build(task, image, record, vocab, transform, rng, vq, image_size) -> Example:
    record = validate_record(record)
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image, got {type(image).__name__}")
    size = image.size
    _fit_boxes(record, size)
    pixels, _ = transform(image, rng)
    has_image = True
    if task.name in IMAGE_OUTPUT_TASKS:
        if record.get("target_codes") is None:
            if vq is None:
                raise ValueError("targets of this task are VQ codes, but no VQ tokenizer was given")
            if task.name == "image_infilling":
                target_image = crop_middle(pixels)
            else:
                target_image = pil_to_tensor(image, image_size or transform.size)
            record["target_codes"] = vq.encode(target_image[None]).flatten().tolist()
        if task.name == "masked_image_modeling" and record.get("masked_patches") is None:
            record["masked_patches"] = block_mask(math.isqrt(len(record["target_codes"])), MIM_RATIO, rng)
    if task.name == "text_to_image" or record.get("text_only"):
        pixels, has_image = torch.zeros_like(pixels), False
    else:
        pixels = task.encoder_image(pixels, record)
    source_ids = vocab.encode(task.source(record, size, vocab))
    target_ids = vocab.encode(task.target(record, size, vocab, rng), add_bos=False, add_eos=False)
    if not target_ids and task.output != "embedding":
        raise ValueError("the target is empty")
    positions = task.loss_positions(record)
    return Example(
        source_ids, target_ids, pixels, has_image, task.output == "codes", positions, task.name, record, size
    )


def _fit_boxes(record: dict, size: tuple[int, int]) -> None:
    """Boxes must lie inside the image (up to BOX_TOLERANCE px, then clamped), or bins would lie."""
    w, h = size
    holders = [record] if "box" in record else []
    holders += [o for o in record.get("objects") or () if isinstance(o, dict)]
    for holder in holders:
        box = holder.get("box")
        if not isinstance(box, Sequence) or len(box) != 4:
            raise ValueError(f"a box is [x0, y0, x1, y1], got {box!r}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 < x0 or y1 < y0:
            raise ValueError(f"box {list(box)} is not [x0, y0, x1, y1] with x0 <= x1, y0 <= y1")
        t = BOX_TOLERANCE
        if x0 < -t or y0 < -t or x1 > w + t or y1 > h + t:
            raise ValueError(f"box {list(box)} lies outside the {w}x{h} image")
        holder["box"] = [
            min(max(x0, 0.0), w),
            min(max(y0, 0.0), h),
            min(max(x1, 0.0), w),
            min(max(y1, 0.0), h),
        ]


def collate(examples: Sequence[Example], pad_id: int = PAD, prompt: bool = False) -> dict[str, Any]:
    """Pad examples into a batch: `decoder_input_ids` = bos + target, `labels` = target + eos (-100 at pads).

    `prompt=True` is OFA's `prompt_type=prev_output` (fine-tuned official models): the decoder input
    is the source minus its eos followed by the target, and the prompt positions carry no loss.
    Besides the model inputs the batch carries `tasks`, `records` and `sizes` for logging and metrics.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    n = len(examples)
    prompts = [e.source_ids[1:-1] if prompt else [] for e in examples]
    src_len = max(len(e.source_ids) for e in examples)
    tgt_len = max(len(p) + len(e.target_ids) for p, e in zip(prompts, examples, strict=True)) + 1
    input_ids = torch.full((n, src_len), pad_id, dtype=torch.long)
    decoder_input_ids = torch.full((n, tgt_len), pad_id, dtype=torch.long)
    labels = torch.full((n, tgt_len), IGNORE_INDEX, dtype=torch.long)
    for i, (p, e) in enumerate(zip(prompts, examples, strict=True)):
        input_ids[i, : len(e.source_ids)] = torch.tensor(e.source_ids)
        if not e.target_ids:  # a contrastive pair: no decoder input, no labels
            continue
        decoder = [BOS, *p, *e.target_ids]
        decoder_input_ids[i, : len(decoder)] = torch.tensor(decoder)
        labels[i, len(p) : len(decoder)] = torch.tensor([*e.target_ids, EOS])
        if e.loss_positions is not None:  # only these target positions (and eos) are predicted
            keep = torch.zeros(len(e.target_ids), dtype=torch.bool)
            keep[list(e.loss_positions)] = True
            labels[i, len(p) : len(p) + len(e.target_ids)][~keep] = IGNORE_INDEX
    return {
        "input_ids": input_ids,
        "patch_images": torch.stack([e.image for e in examples]),
        "patch_masks": torch.tensor([e.has_image for e in examples]),
        "decoder_input_ids": decoder_input_ids,
        "labels": labels,
        "code_mask": torch.tensor([e.code_output for e in examples]),
        "tasks": [e.task for e in examples],
        "records": [e.record for e in examples],
        "sizes": [e.size for e in examples],
    }


def contrastive(task: str) -> bool:
    """Whether `task` trains on image-text pairs (output "embedding": itc), not on a decoder target."""
    return get_task(task).output == "embedding"


def split_by_output(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """The batch as at most three batches, text outputs, image-code outputs and contrastive pairs
    (`contrastive`), each trimmed to its own padding. A few 64-code targets would otherwise pad every
    text target in the batch to their length, and the decoder would run both its text and code paths
    for every sample; pairs have no decoder target at all."""
    pairs = torch.tensor([contrastive(t) for t in batch["tasks"]])
    kind = batch["code_mask"].long() + 2 * pairs.long()  # 0: text, 1: codes, 2: pairs
    groups = [rows for k in range(3) if len(rows := torch.nonzero(kind == k).flatten())]
    if len(groups) == 1:
        return [batch]
    parts = []
    for rows in groups:
        part = {k: v[rows] if torch.is_tensor(v) else [v[i] for i in rows.tolist()] for k, v in batch.items()}
        src = int(part["input_ids"].ne(PAD).sum(1).max())
        labelled = part["labels"].ne(IGNORE_INDEX).nonzero()[:, 1]
        tgt = int(labelled.max()) + 1 if len(labelled) else 1
        part["input_ids"] = part["input_ids"][:, :src]
        part["decoder_input_ids"], part["labels"] = (
            part["decoder_input_ids"][:, :tgt],
            part["labels"][:, :tgt],
        )
        parts.append(part)
    return parts


# ---------------------------------------------------------------------------------------------------
# Deterministic datasets


def item_rng(seed: int, index: int, salt: str = "") -> random.Random:
    """The rng of item `index`: a function of (seed, index) only (string seeds hash with SHA-512,
    the same in every process), so any worker or resumed run rebuilds the same item."""
    return random.Random(f"{seed}/{index}/{salt}")


def weighted_choice(rng: random.Random, weights: Mapping[str, float]) -> str:
    names = [k for k, w in weights.items() if w > 0]
    if not names:
        raise ValueError(f"no positive weight among {dict(weights)}")
    return rng.choices(names, weights=[weights[k] for k in names])[0]


class ExampleDataset(Dataset):
    """Shared plumbing: the image transform and the VQ settings every source applies."""

    def __init__(
        self,
        vocab: Vocab,
        image_size: int,
        seed: int = 0,
        vq: Any = None,
        code_image_size: int | None = None,
        augment: bool = False,
        evidence: bool = False,
    ) -> None:
        self.vocab, self.seed, self.vq, self.code_image_size = vocab, seed, vq, code_image_size
        self.transform = ImageTransform(image_size, augment=augment)
        self.evidence = evidence

    def example(self, image: Image.Image, record: Mapping[str, Any], rng: random.Random) -> Example:
        return build_example(
            image, record, self.vocab, self.transform, rng, self.vq, self.code_image_size, self.evidence
        )


class ShapesMultitask(ExampleDataset):
    """Item i: a task drawn by `tasks` weight from (seed, i) and scene `i % num_scenes` of `split`.

    With `num_scenes=None` every item renders a fresh scene; a smaller pool revisits scenes, each
    time with an independently drawn task and record. If the drawn task has no record in that scene
    (e.g. no referring expression), the draw is repeated among the tasks the scene has.
    """

    def __init__(
        self,
        split: str,
        tasks: Mapping[str, float],
        vocab: Vocab,
        image_size: int,
        seed: int = 0,
        length: int = shapes.SPLIT_SIZE,
        num_scenes: int | None = None,
        scene_size: int = 128,
        vq: Any = None,
        code_image_size: int | None = None,
        augment: bool = False,
        evidence: bool = False,
    ) -> None:
        super().__init__(vocab, image_size, seed, vq, code_image_size, augment, evidence)
        unknown = sorted(set(tasks) - set(shapes.TASKS))
        if unknown:
            raise ValueError(f"the shapes world has no tasks {unknown}; it has {', '.join(shapes.TASKS)}")
        self.tasks = {k: float(w) for k, w in tasks.items() if w > 0}
        if not self.tasks:
            raise ValueError(f"no task with a positive weight in {dict(tasks)}")
        require_vq(list(self.tasks), vq)
        shapes.scene_seed(split, 0)  # validates the split name
        self.split, self.length, self.scene_size = split, length, scene_size
        self.num_scenes = num_scenes or shapes.SPLIT_SIZE

    def __len__(self) -> int:
        return self.length

    def task_for(self, index: int) -> str:
        """The task item `index` draws first (no rendering; for checking the mix)."""
        return weighted_choice(item_rng(self.seed, index), self.tasks)

    def sample(self, index: int) -> tuple[Image.Image, dict, random.Random]:
        """The `(image, record)` of item `index` and the rng that continues its draws."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} outside [0, {self.length})")
        rng = item_rng(self.seed, index)
        task = weighted_choice(rng, self.tasks)
        # A scene without a record of any mixed task (rare: e.g. only grounding and no unique
        # referring expression) hands the item on to the next scene.
        for k in range(100):
            image, scene = shapes.sample(self.split, (index + k) % self.num_scenes, self.scene_size)
            # the drawn task's records alone are usually enough (building every task's costs more)
            records = shapes.scene_records(scene, shapes.record_rng(scene.seed), [task])
            if not records:
                records = shapes.scene_records(scene, shapes.record_rng(scene.seed), self.tasks)
            available = {k: w for k, w in self.tasks.items() if any(r["task"] == k for r in records)}
            if available:
                if task not in available:
                    task = weighted_choice(rng, available)
                return image, rng.choice([r for r in records if r["task"] == task]), rng
        raise RuntimeError(f"no scene near item {index} has a record of the tasks {sorted(self.tasks)}")

    def __getitem__(self, index: int) -> Example:
        image, record, rng = self.sample(index)
        return self.example(image, record, rng)


class RecordsDataset(ExampleDataset):
    """Item i = the i-th record of a real-format source (`open_dataset(spec)`), optionally only `tasks`.

    Records are listed without decoding images; an image is decoded when its item is read. Errors
    name the file and line (or entry) and the record. The record list is rebuilt in a process that
    unpickles the dataset (image loaders are closures, which do not pickle).
    """

    def __init__(
        self,
        spec: str | Mapping[str, Any],
        vocab: Vocab,
        image_size: int,
        seed: int = 0,
        tasks: Sequence[str] | None = None,
        vq: Any = None,
        code_image_size: int | None = None,
        augment: bool = False,
        evidence: bool = False,
    ) -> None:
        super().__init__(vocab, image_size, seed, vq, code_image_size, augment, evidence)
        self.spec, self.task_filter = spec, None if tasks is None else set(tasks)
        self._samples = self._read()
        if not self._samples:
            only = f" of tasks {sorted(self.task_filter)}" if self.task_filter is not None else ""
            raise ValueError(f"dataset {spec!r} has no records{only}")
        require_vq(sorted({s.record["task"] for s in self._samples}), vq)

    def _read(self) -> list:
        samples = open_dataset(self.spec).records()
        return [s for s in samples if self.task_filter is None or s.record["task"] in self.task_filter]

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_samples"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._samples = self._read()

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> Example:
        sample = self._samples[index]
        image = sample.load_image()
        try:
            return self.example(image, sample.record, item_rng(self.seed, index))
        except RecordError as e:
            raise RecordError(f"{sample.location}: {e}") from e


class Mixture(Dataset):
    """Item i comes from a source drawn by weight from (seed, i), at an index drawn from (seed, i)."""

    def __init__(
        self, sources: Sequence[tuple[Dataset, float]], seed: int = 0, length: int = shapes.SPLIT_SIZE
    ):
        self.sources = [(ds, float(w)) for ds, w in sources if w > 0]
        if not self.sources:
            raise ValueError("a mixture needs at least one source with a positive weight")
        self.seed, self.length = seed, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Example:
        rng = item_rng(self.seed, index, "mixture")
        source = rng.choices([ds for ds, _ in self.sources], weights=[w for _, w in self.sources])[0]
        return source[rng.randrange(len(source))]


class IndexSampler(Sampler[list[int]]):
    """Endless batches of consecutive indices: micro-batch m of `rank` holds indices
    `(m * world_size + rank) * batch_size + j`. The whole state is `start` (the next micro-batch),
    and ranks never share an index."""

    def __init__(self, batch_size: int, start: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1 or not 0 <= rank < world_size or start < 0:
            raise ValueError(
                f"bad sampler settings: batch_size={batch_size}, rank={rank}/{world_size}, start={start}"
            )
        self.batch_size, self.start, self.rank, self.world_size = batch_size, start, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        m = self.start
        while True:
            first = (m * self.world_size + self.rank) * self.batch_size
            yield list(range(first, first + self.batch_size))
            m += 1


# ---------------------------------------------------------------------------------------------------
# The shapes-world vocabulary


_TEXT_FIELDS = (
    "captions",
    "question",
    "answers",
    "candidates",
    "text",
    "texts",
    "text1",
    "text2",
    "label",
    "caption",
)


def image_batches(spec: str, n: int, size: int, batch_size: int = 32) -> Iterator[torch.Tensor]:
    """The images of the first `n` samples of `spec` ('shapes': the train split; else a reader spec,
    where an image with several records counts once per record), preprocessed to `size`, in batches
    (for recomputing BatchNorm statistics)."""
    if n < 1:
        raise ValueError(f"need at least one image, got n={n}")
    transform = ImageTransform(size)
    if spec == "shapes":
        source: Iterator[Image.Image] = (shapes.sample("train", i)[0] for i in range(n))
    else:
        source = (img for img, _ in open_dataset(spec))
    images = islice(source, n)
    while batch := [transform(image)[0] for image in islice(images, batch_size)]:
        yield torch.stack(batch)


def shapes_corpus(num_scenes: int, split: str = "train") -> Iterator[str]:
    """Every text of the first `num_scenes` scenes' records, plus the instruction templates."""
    for entry in load_templates().values():
        yield entry["template"].replace("{", " ").replace("}", " ")
        yield from entry.get("labels", ())
    for index in range(num_scenes):
        scene = shapes.make_scene(shapes.scene_seed(split, index))
        for record in shapes.scene_records(scene, shapes.record_rng(scene.seed)):
            for key in _TEXT_FIELDS:
                value = record.get(key)
                yield from [value] if isinstance(value, str) else value or ()
            for obj in record.get("objects", ()):
                yield obj["label"]


def build_shapes_vocab(
    out_dir: str | Path, vocab_size: int, num_codes: int, num_bins: int, num_scenes: int = 2000
) -> Vocab:
    """Train the SentencePiece BPE (byte fallback) on shapes-world text and save the Vocab in `out_dir`."""
    model = train_sentencepiece(shapes_corpus(num_scenes), out_dir, vocab_size)
    vocab = Vocab.from_sentencepiece(model, num_codes, num_bins)
    vocab.save(out_dir)
    return vocab


__all__ = [
    "IGNORE_INDEX",
    "IMAGE_OUTPUT_TASKS",
    "DataError",
    "Example",
    "ExampleDataset",
    "IndexSampler",
    "Mixture",
    "RecordError",
    "RecordsDataset",
    "ShapesMultitask",
    "build_example",
    "build_shapes_vocab",
    "collate",
    "contrastive",
    "item_rng",
    "require_vq",
    "shapes_corpus",
    "split_by_output",
    "weighted_choice",
]
