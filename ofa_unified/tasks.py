"""Task definitions: every task is an instruction (a template filled from a record) and every answer
is tokens of the joint vocabulary. Training, evaluation and serving all go through these objects, so
a template and the way its output is read live in exactly one place.

A task knows its source text (`source`), its training target (`target`), the decoding constraint
that keeps its output well formed (`constraint`), how to read generated ids back into a result
(`parse`) and how to score results (`evaluate`). Templates and decoding defaults are data in
`instructions/templates.json`; adding a task is an entry there plus one instance registered here.

Boxes are `[x0, y0, x1, y1]` (x first) in the pixel frame `size=(W, H)` that the caller names: the
frame the record's box is in when building sources/targets, the frame wanted back when parsing
(the model squashes the image to a square, so bins are fractions of W and H either way).
Text answers carry a leading space, as OFA encodes them (" yes"); `answer_text` is the one place
that rule lives, used for targets and for decoding candidates alike.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
import random
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from ofa_unified import metrics
from ofa_unified.generate import (
    Constraint,
    EvidenceConstraint,
    GenerationConfig,
    TokenRangeConstraint,
    TrieConstraint,
    split_at,
)
from ofa_unified.vocab import BOS, EOS, PAD, Vocab, dequantize, quantize
from ofa_unified.vq import mask_middle, mask_patches

TEMPLATES_PATH = Path(str(importlib.resources.files("instructions") / "templates.json"))
# Keys of a template entry that are GenerationConfig settings.
_DECODING_KEYS = (
    "beam_size",
    "max_new_tokens",
    "min_new_tokens",
    "no_repeat_ngram_size",
    "do_sample",
    "top_k",
    "top_p",
    "temperature",
)

Size = tuple[float, float]
Record = dict[str, Any]


class ParseError(ValueError):
    """Generated tokens do not form a well-formed answer of the task."""


class UnknownTaskError(ValueError):
    """A task name that is not registered."""


@functools.cache
def load_templates(path: Path = TEMPLATES_PATH) -> dict[str, dict[str, Any]]:
    """Task name -> template entry, read once."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------
# Shared pieces


def _clean(text: Any) -> str:
    """One line of single-spaced text: record strings go inside templates and targets."""
    return " ".join(str(text).split())


def answer_text(text: str) -> str:
    """Target text of an answer: OFA puts a space before every answer (" yes", " a red circle")."""
    return " " + _clean(text)


def encode_answer(vocab: Vocab, text: str) -> list[int]:
    """Ids of an answer exactly as they appear in a target (no bos/eos): decoding candidates use this."""
    return vocab.encode(answer_text(text), add_bos=False, add_eos=False)


# A verdict written after its evidence: " small circles: blue answer: no" (models with
# OFAConfig.answer_evidence). A record's "evidence" is the text that settles its answer.
EVIDENCE_SEPARATOR = " answer:"
MAX_EVIDENCE_TOKENS = 64


def verdict_target(record: Record, answer: str) -> str:
    """`answer` (target text) after the record's evidence and the separator, when it has evidence."""
    evidence = _clean(record.get("evidence") or "")
    return f" {evidence}{EVIDENCE_SEPARATOR}{answer}" if evidence else answer


def split_evidence(tokens: Sequence[int], vocab: Vocab) -> tuple[list[int], list[int] | None]:
    """(answer ids, evidence ids or None) of generated ids, cut where EvidenceConstraint cuts them."""
    parts = split_at(tokens, vocab.encode(EVIDENCE_SEPARATOR, add_bos=False, add_eos=False))
    return (parts[1], parts[0]) if parts is not None else (list(tokens), None)


def evidence_constraint(vocab: Vocab, constraint: Constraint | None) -> Constraint | None:
    """A candidate trie opened to evidence first (for models trained with answer_evidence); other
    constraints are returned as they are."""
    if not isinstance(constraint, TrieConstraint):
        return constraint
    separator = vocab.encode(EVIDENCE_SEPARATOR, add_bos=False, add_eos=False)
    return EvidenceConstraint(constraint, separator, range(EOS + 1, vocab.code_offset), MAX_EVIDENCE_TOKENS)


def _with_evidence(result: dict, evidence: list[int] | None, vocab: Vocab) -> dict:
    return {**result, "evidence": _clean(vocab.decode(evidence))} if evidence is not None else result


def answer_trie(vocab: Vocab, candidates: Sequence[str]) -> TrieConstraint:
    """Trie over the encoded candidate answers, so every finished hypothesis is one of them."""
    cleaned = [_clean(c) for c in candidates]
    if not cleaned or not all(cleaned):
        raise ValueError(f"candidates must be non-empty strings, got {list(candidates)!r}")
    return TrieConstraint([encode_answer(vocab, c) for c in cleaned], eos_id=EOS)


def box_bins(box: Sequence[float], size: Size, vocab: Vocab) -> str:
    """The 4 literal bin tokens ("<bin_a> <bin_b> <bin_c> <bin_d>") of a box in the `size` frame."""
    if len(box) != 4:
        raise ValueError(f"a box is [x0, y0, x1, y1], got {list(box)!r}")
    w, h = size
    frames = (w, h, w, h)
    return " ".join(
        f"<bin_{quantize(float(v), s, vocab.num_bins)}>" for v, s in zip(box, frames, strict=True)
    )


def _tokens(tokens: Sequence[int], vocab: Vocab) -> list[int]:
    """Generated ids as ints, range-checked, without a leading bos or trailing eos/pad."""
    ids = [int(t) for t in tokens]
    bad = [t for t in ids if not 0 <= t < len(vocab)]
    if bad:
        raise ParseError(f"token ids out of the vocabulary [0, {len(vocab)}): {bad[:8]}")
    if ids and ids[0] == BOS:
        ids = ids[1:]
    while ids and ids[-1] in (EOS, PAD):
        ids.pop()
    if not ids:
        raise ParseError("empty output: no tokens before eos")
    return ids


def _box(ids: Sequence[int], vocab: Vocab, size: Size) -> list[float]:
    """Box from exactly 4 bin ids, dequantized into the `size` frame; ParseError if malformed."""
    if len(ids) != 4 or not all(vocab.is_bin(t) for t in ids):
        raise ParseError(f"a box is 4 bin tokens, got {vocab.decode(ids)!r}")
    w, h = size
    frames = (w, h, w, h)
    x0, y0, x1, y1 = (
        dequantize(t - vocab.bin_offset, s, vocab.num_bins) for t, s in zip(ids, frames, strict=True)
    )
    if x1 < x0 or y1 < y0:
        raise ParseError(f"box {vocab.decode(ids)} has x1 < x0 or y1 < y0")
    return [x0, y0, x1, y1]


def _text(ids: Sequence[int], vocab: Vocab, what: str) -> str:
    """Decoded text of ids that must be subwords only (no bins or codes), non-empty."""
    stray = [t for t in ids if vocab.is_bin(t) or vocab.is_code(t)]
    if stray:
        raise ParseError(f"expected {what} but found bin/code tokens: {vocab.decode(stray)!r}")
    text = _clean(vocab.decode(ids))
    if not text:
        raise ParseError(f"expected {what} but the output decodes to empty text")
    return text


def _field(prediction: dict | None, key: str, default: Any) -> Any:
    """A prediction's value; a prediction that failed to parse may be None (then it scores as wrong)."""
    return default if prediction is None else prediction.get(key, default)


def mask_span(text: str, rng: random.Random, ratio: float = 0.3) -> str:
    """`text` with one span of whole words (about `ratio` of them, at least one) replaced by `<mask>`."""
    words = _clean(text).split()
    if not words:
        raise ValueError("cannot mask an empty text")
    n = max(1, round(len(words) * ratio))
    start = rng.randrange(len(words) - n + 1)
    return " ".join([*words[:start], "<mask>", *words[start + n :]])


def prefix_split(text: str, rng: random.Random) -> tuple[str, str]:
    """`text` cut at a random word boundary into a non-empty prefix and suffix (SimVLM's PrefixLM):
    `prefix + " " + suffix` is the text, single-spaced."""
    words = _clean(text).split()
    if len(words) < 2:
        raise ValueError(f"a prefix/suffix split needs at least 2 words, got {text!r}")
    cut = rng.randint(1, len(words) - 1)
    return " ".join(words[:cut]), " ".join(words[cut:])


# ---------------------------------------------------------------------------------------------------
# The base task


class Task:
    """One task: its template entry plus the rules for targets, constraints, parsing and scoring."""

    def __init__(self, name: str, spec: dict[str, Any] | None = None) -> None:
        spec = load_templates()[name] if spec is None else spec
        self.name = name
        self.template: str = spec["template"]
        self.fields: tuple[str, ...] = tuple(spec["fields"])
        self.output: str = spec["output"]
        self.metric_name: str = spec["metric"]
        self.labels: tuple[str, ...] = tuple(spec.get("labels", ()))
        self.decoding: dict[str, Any] = {k: spec[k] for k in _DECODING_KEYS if k in spec}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def _require(self, record: Record, keys: Sequence[str]) -> None:
        missing = [k for k in keys if record.get(k) is None]
        if missing:
            raise ValueError(f"{self.name} record lacks field(s) {missing}; it has {sorted(record)}")

    def template_values(self, record: Record, size: Size, vocab: Vocab) -> dict[str, str]:
        """Values of the template's placeholders; by default the required fields as clean text."""
        return {f: _clean(record[f]) for f in self.fields}

    def source(self, record: Record, size: Size, vocab: Vocab) -> str:
        """Instruction text that follows the image in the encoder input."""
        self._require(record, self.fields)
        return self.template.format(**self.template_values(record, size, vocab))

    def target(self, record: Record, size: Size, vocab: Vocab, rng: random.Random | None = None) -> str:
        """Training target text (literal `<bin_i>`/`<code_i>` where the answer is a box or image)."""
        raise NotImplementedError

    def loss_positions(self, record: Record) -> list[int] | None:
        """Target positions that carry the training loss; None: all of them."""
        return None

    def encoder_image(self, pixels: Tensor, record: Record) -> Tensor:
        """What the encoder sees of the preprocessed image; tasks that hide part of it override this."""
        return pixels

    def constraint(
        self, vocab: Vocab, record: Record | None = None, candidates: Sequence[str] | None = None
    ) -> Constraint | None:
        """Decoding constraint keeping the output well formed; None = free decoding."""
        return None

    def parse(self, tokens: Sequence[int], vocab: Vocab, size: Size, record: Record | None = None) -> dict:
        """Structured result of generated ids (no bos/eos); ParseError if they do not fit the task."""
        raise NotImplementedError

    def evaluate(self, predictions: Sequence[dict | None], records: Sequence[Record]) -> dict[str, float]:
        """Metrics of parsed predictions against their records; `metric_name` is the headline key."""
        raise NotImplementedError

    def generation_kwargs(self, record: Record | None = None) -> dict[str, Any]:
        """The task's decoding defaults as GenerationConfig keyword arguments."""
        return dict(self.decoding)

    def generation_config(self, record: Record | None = None, **overrides: Any) -> GenerationConfig:
        """GenerationConfig with the task's defaults, `overrides` (e.g. a request's beam_size) on top."""
        return GenerationConfig(**{**self.generation_kwargs(record), **overrides})


# ---------------------------------------------------------------------------------------------------
# Text answers


class TextTask(Task):
    """Free text answer: parse -> {"text"}."""

    def parse(self, tokens: Sequence[int], vocab: Vocab, size: Size, record: Record | None = None) -> dict:
        return {"text": _text(_tokens(tokens, vocab), vocab, "text")}


class CaptionTask(TextTask):
    """Image captioning; target = a reference caption (random one when training with an rng)."""

    def target(self, record: Record, size: Size, vocab: Vocab, rng: random.Random | None = None) -> str:
        self._require(record, ["captions"])
        captions = record["captions"]
        if not captions:
            raise ValueError(f"{self.name} record has an empty 'captions' list")
        return answer_text(rng.choice(captions) if rng is not None else captions[0])

    def references(self, record: Record) -> list[str]:
        return list(record["captions"])

    def evaluate(self, predictions: Sequence[dict | None], records: Sequence[Record]) -> dict[str, float]:
        return metrics.caption_scores(
            [_field(p, "text", "") for p in predictions], [self.references(r) for r in records]
        )


class GroundedCaptionTask(CaptionTask):
    """Describe a region given as 4 bins at the end of the source; target = the region's text."""

    def template_values(self, record: Record, size: Size, vocab: Vocab) -> dict[str, str]:
        return {"box": box_bins(record["box"], size, vocab)}

    def target(self, record: Record, size: Size, vocab: Vocab, rng: random.Random | None = None) -> str:
        self._require(record, ["text"])
        if rng is not None and record.get("texts"):
            return answer_text(rng.choice(record["texts"]))
        return answer_text(record["text"])

    def references(self, record: Record) -> list[str]:
        return list(record.get("texts") or [record["text"]])


class TextInfillingTask(TextTask):
    """Restore a text with one span masked; the mask is seeded by the text, so a record always
    gives the same source (or the record brings its own `masked_text`)."""

    mask_ratio = 0.3

    def template_values(self, record: Record, size: Size, vocab: Vocab) -> dict[str, str]:
        if record.get("masked_text"):
            return {"masked_text": _clean(record["masked_text"])}
        seed = record.get("mask_seed", zlib.crc32(_clean(record["text"]).encode("utf-8")))
        return {"masked_text": mask_span(record["text"], random.Random(seed), self.mask_ratio)}

    def target(self, record: Record, size: Size, vocab: Vocab, rng: random.Random | None = None) -> str:
        self._require(record, ["text"])
        return answer_text(record["text"])

    def evaluate(self, predictions: Sequence[dict | None], records: Sequence[Record]) -> dict[str, float]:
        preds = [_field(p, "text", "") for p in predictions]
        return {"exact_match": metrics.exact_match(preds, [r["text"] for r in records])}


class PrefixLMTask(TextTask):
    """SimVLM's PrefixLM: the encoder reads the image (if any) and a text's first words, the decoder
    writes the rest. The cut is seeded by the text (or the record's `split_seed`), so a record always
    gives the same source and target."""

    def split(self, record: Record) -> tuple[str, str]:
        self._require(record, ["text"])
        seed = record.get("split_seed", zlib.crc32(_clean(record["text"]).encode("utf-8")))
        return prefix_split(record["text"], random.Random(seed))

    def template_values(self, record: Record, size: Size, vocab: Vocab) -> dict[str, str]:
        return {"prefix": self.split(record)[0]}

    def target(self, record: Record, size: Size, vocab: Vocab, rng: random.Random | None = None) -> str:
        return answer_text(self.split(record)[1])

    def evaluate(self, predictions: Sequence[dict | None], records: Sequence[Record]) -> dict[str, float]:
        preds = [_field(p, "text", "") for p in predictions]
        return {"exact_match": metrics.exact_match(preds, [self.split(r)[1] for r in records])}


class ContrastiveTask(Task):
    """Image-text contrastive learning (VLMo's ITC): the record's image and its `text` are a pair, the
    other pairs of a batch its negatives. The source is the text alone, encoded as retrieval queries
    are (`OFAModel.embed(input_ids=vocab.encode(text))`); there is no decoder target, so nothing is
    generated or parsed: the trainer scores pairs with `model.itc_loss` and `in_batch_recall`."""

    def target(self, record: Record, size: Size, vocab: Vocab, rng: random.Random | None = None) -> str:
        return ""

    def parse(self, tokens: Sequence[int], vocab: Vocab, size: Size, record: Record | None = None) -> dict:
        raise ParseError(f"{self.name} writes no tokens; embed the image and the text (OFAModel.embed)")


class VQATask(Task):
    """Open or closed-set VQA: a trie over the candidate answers when a list is given."""

    def template_values(self, record: Record, size: Size, vocab: Vocab) -> dict[str, str]:
        question = _clean(record["question"])
        return {"question": question if question.endswith("?") else question + "?"}

    def target(self, record: Record, size: Size, vocab: Vocab, rng: random.Random | None = None) -> str:
        self._require(record, ["answers"])
        if not record["answers"]:
            raise ValueError(f"{self.name} record has an empty 'answers' list")
        # Most common human answer; ties go to the one given first.
        answer = Counter(_clean(a) for a in record["answers"]).most_common(1)[0][0]
        return verdict_target(record, answer_text(answer))

    def constraint(
        self, vocab: Vocab, record: Record | None = None, candidates: Sequence[str] | None = None
    ) -> Constraint | None:
        candidates = candidates if candidates is not None else (record or {}).get("candidates")
        return answer_trie(vocab, candidates) if candidates is not None else None

    def parse(self, tokens: Sequence[int], vocab: Vocab, size: Size, record: Record | None = None) -> dict:
        answer, evidence = split_evidence(_tokens(tokens, vocab), vocab)
        return _with_evidence({"answer": _text(answer, vocab, "an answer")}, evidence, vocab)

    def evaluate(self, predictions: Sequence[dict | None], records: Sequence[Record]) -> dict[str, float]:
        """Accuracy overall and, for records that carry a `question_type` (the shapes world's), per
        type: a model that reads colours but answers every yes/no question alike shows up here."""
        preds = [_field(p, "answer", "") for p in predictions]
        out = {"vqa_accuracy": metrics.vqa_accuracy(preds, [r["answers"] for r in records])}
        kinds: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            if "question_type" in r:
                kinds.setdefault(r["question_type"], []).append(i)
        for kind, idx in sorted(kinds.items()):
            picked = [preds[i] for i in idx], [records[i]["answers"] for i in idx]
            out[f"vqa_accuracy/{kind}"] = metrics.vqa_accuracy(*picked)
        return out


class ClassificationTask(Task):
    """A closed label set (ITM and QA matching yes/no, visual entailment yes/no/maybe), decoded
    through a trie so the answer is always one of the labels."""

    def target(self, record: Record, size: Size, vocab: Vocab, rng: random.Random | None = None) -> str:
        self._require(record, ["label"])
        label = _clean(record["label"]).lower()
        if label not in self.labels:
            raise ValueError(f"{self.name} label must be one of {list(self.labels)}, got {record['label']!r}")
        return verdict_target(record, answer_text(label))

    def constraint(
        self, vocab: Vocab, record: Record | None = None, candidates: Sequence[str] | None = None
    ) -> Constraint | None:
        return answer_trie(vocab, candidates if candidates is not None else self.labels)

    def parse(self, tokens: Sequence[int], vocab: Vocab, size: Size, record: Record | None = None) -> dict:
        ids, evidence = split_evidence(_tokens(tokens, vocab), vocab)
        answer = _text(ids, vocab, "a label").lower()
        if answer not in self.labels:
            raise ParseError(f"{self.name} answer must be one of {list(self.labels)}, got {answer!r}")
        return _with_evidence({"answer": answer}, evidence, vocab)

    def evaluate(self, predictions: Sequence[dict | None], records: Sequence[Record]) -> dict[str, float]:
        """Accuracy, and the share of the most frequent answer (1.0: one label whatever the input)."""
        preds = [_field(p, "answer", "") for p in predictions]
        top = Counter(preds).most_common(1)[0][1] / len(preds) if preds else 0.0
        return {"accuracy": metrics.accuracy(preds, [r["label"] for r in records]), "top_answer_share": top}


# ---------------------------------------------------------------------------------------------------
# Boxes


class GroundingTask(Task):
    """Visual grounding: the answer is exactly 4 bins."""

    def target(self, record: Record, size: Size, vocab: Vocab, rng: random.Random | None = None) -> str:
        self._require(record, ["box"])
        return box_bins(record["box"], size, vocab)

    def constraint(
        self, vocab: Vocab, record: Record | None = None, candidates: Sequence[str] | None = None
    ) -> Constraint | None:
        return TokenRangeConstraint(vocab.bin_offset, vocab.bin_offset + vocab.num_bins, exact_len=4)

    def parse(self, tokens: Sequence[int], vocab: Vocab, size: Size, record: Record | None = None) -> dict:
        return {"box": _box(_tokens(tokens, vocab), vocab, size)}

    def evaluate(self, predictions: Sequence[dict | None], records: Sequence[Record]) -> dict[str, float]:
        boxes = [_field(p, "box", [0.0, 0.0, 0.0, 0.0]) for p in predictions]
        return metrics.grounding_scores(boxes, [r["box"] for r in records])


class DetectionTask(Task):
    """Object detection: `{4 bins} {label}` per object, objects ordered by (y0, x0) unless
    `sort_objects` is off (then as the record lists them)."""

    def __init__(self, name: str, spec: dict[str, Any] | None = None, sort_objects: bool = True) -> None:
        super().__init__(name, spec)
        self.sort_objects = sort_objects

    def target(self, record: Record, size: Size, vocab: Vocab, rng: random.Random | None = None) -> str:
        self._require(record, ["objects"])
        objects = record["objects"]
        if not objects:
            raise ValueError(f"{self.name} record has no objects to make a target of")
        if self.sort_objects:
            objects = sorted(objects, key=lambda o: (o["box"][1], o["box"][0]))
        return " ".join(f"{box_bins(o['box'], size, vocab)}{answer_text(o['label'])}" for o in objects)

    def parse(self, tokens: Sequence[int], vocab: Vocab, size: Size, record: Record | None = None) -> dict:
        ids = _tokens(tokens, vocab)
        objects, i = [], 0
        while i < len(ids):
            box = _box(ids[i : i + 4], vocab, size)
            end = i + 4
            while end < len(ids) and not vocab.is_bin(ids[end]):
                end += 1
            label = _text(ids[i + 4 : end], vocab, f"a label after object {len(objects)}'s box")
            objects.append({"box": box, "label": label})
            i = end
        return {"objects": objects}

    def evaluate(self, predictions: Sequence[dict | None], records: Sequence[Record]) -> dict[str, float]:
        preds = [_field(p, "objects", []) for p in predictions]
        return metrics.detection_map(preds, [r["objects"] for r in records])


# ---------------------------------------------------------------------------------------------------
# Image codes


class ImageCodeTask(Task):
    """The answer is a grid of image codes (image infilling: the middle; text-to-image: the whole
    image). Targets come from `record["target_codes"]`, which the data pipeline computes with the VQ
    tokenizer. The number of codes is `record["code_grid"]` ([rows, cols] or a side), else
    len(target_codes), else the template's grid (OFA's)."""

    def __init__(self, name: str, spec: dict[str, Any] | None = None) -> None:
        super().__init__(name, spec)
        spec = load_templates()[name] if spec is None else spec
        self.code_grid: list[int] = list(spec["code_grid"])
        # The picture is the pixel mean of the decoded samples (`beam_size` of them with `do_sample`):
        # the least-squares guess where the model is unsure, so blurred there.
        self.mean_image = bool(spec.get("mean_image", False))

    def num_codes(self, record: Record | None = None) -> int:
        """Codes in the answer (rows * cols of the grid)."""
        record = record or {}
        grid = record.get("code_grid")
        if grid is None and record.get("target_codes") is not None:
            return len(record["target_codes"])
        if grid is None:
            grid = self.code_grid
        rows, cols = (grid, grid) if isinstance(grid, int) else grid
        return int(rows) * int(cols)

    def target(self, record: Record, size: Size, vocab: Vocab, rng: random.Random | None = None) -> str:
        codes = record.get("target_codes")
        if codes is None:
            raise ValueError(
                f"{self.name} targets need record['target_codes']: the VQ tokenizer's codes of the "
                "target image (computed by the data pipeline), absent from this record"
            )
        bad = [c for c in codes if not 0 <= int(c) < vocab.num_codes]
        if bad or not codes:
            raise ValueError(f"target_codes must be non-empty ints in [0, {vocab.num_codes}), got {bad[:8]}")
        return " ".join(f"<code_{int(c)}>" for c in codes)

    def constraint(
        self, vocab: Vocab, record: Record | None = None, candidates: Sequence[str] | None = None
    ) -> Constraint | None:
        lo = vocab.code_offset
        return TokenRangeConstraint(lo, lo + vocab.num_codes, exact_len=self.num_codes(record))

    def parse(self, tokens: Sequence[int], vocab: Vocab, size: Size, record: Record | None = None) -> dict:
        ids = _tokens(tokens, vocab)
        other = [t for t in ids if not vocab.is_code(t)]
        if other:
            raise ParseError(f"expected only image codes, got {vocab.decode(other)!r}")
        want = self.num_codes(record)
        if len(ids) != want:
            raise ParseError(f"expected {want} image codes, got {len(ids)}")
        return {"codes": [t - vocab.code_offset for t in ids]}

    def evaluate(self, predictions: Sequence[dict | None], records: Sequence[Record]) -> dict[str, float]:
        preds = [_field(p, "codes", []) for p in predictions]
        return {"code_accuracy": metrics.code_accuracy(preds, [r["target_codes"] for r in records])}

    def generation_kwargs(self, record: Record | None = None) -> dict[str, Any]:
        n = self.num_codes(record)
        return {**self.decoding, "max_new_tokens": n, "min_new_tokens": n}


class InfillingTask(ImageCodeTask):
    """Image infilling: the encoder sees the image with its middle blanked; the answer is the middle's
    code grid."""

    def encoder_image(self, pixels: Tensor, record: Record) -> Tensor:
        return mask_middle(pixels)


class MaskedImageTask(ImageCodeTask):
    """BEiT's masked image modeling as a seq2seq task: the encoder sees the image with the patches
    `record["masked_patches"]` (raster indices of the code grid) blanked, the decoder writes the code
    grid of the complete image, and only the masked positions carry loss and are scored."""

    def loss_positions(self, record: Record) -> list[int] | None:
        return record.get("masked_patches")

    def encoder_image(self, pixels: Tensor, record: Record) -> Tensor:
        grid = math.isqrt(self.num_codes(record))
        return mask_patches(pixels, record.get("masked_patches") or [], grid)

    def evaluate(self, predictions: Sequence[dict | None], records: Sequence[Record]) -> dict[str, float]:
        preds, targets = [], []
        for p, r in zip(predictions, records, strict=True):
            codes = _field(p, "codes", [])
            where = r.get("masked_patches") or range(len(r["target_codes"]))
            preds.append([codes[i] if i < len(codes) else -1 for i in where])
            targets.append([r["target_codes"][i] for i in where])
        return {"masked_code_accuracy": metrics.code_accuracy(preds, targets)}


# ---------------------------------------------------------------------------------------------------
# Registry


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add a task under its name (one name, one definition)."""
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}") from None


def list_tasks() -> list[str]:
    return sorted(TASKS)


# The field a task's free text fills (the CLI's --text, the chat API's message); "text" if not listed.
TEXT_FIELD = {
    "vqa": "question",
    "text_to_image": "caption",
    "visual_entailment": "text2",
    "qa_matching": "question",
}


def text_field(task: Task) -> str | None:
    """The record field free text goes into, or None when the task takes no text (caption, boxes)."""
    name = TEXT_FIELD.get(task.name, "text")
    return name if name in task.fields else None


for _task in (
    CaptionTask("caption"),
    VQATask("vqa"),
    GroundingTask("grounding"),
    GroundedCaptionTask("grounded_caption"),
    ClassificationTask("itm"),
    DetectionTask("detection"),
    InfillingTask("image_infilling"),
    ImageCodeTask("text_to_image"),
    MaskedImageTask("masked_image_modeling"),
    TextInfillingTask("text_infilling"),
    ClassificationTask("visual_entailment"),
    ClassificationTask("qa_matching"),
    PrefixLMTask("prefix_lm"),
    ContrastiveTask("itc"),
):
    register(_task)


# ---------------------------------------------------------------------------------------------------
# Free instructions


def instruction_source(text: str) -> str:
    """Source of a free `--instruction`: the text itself, with OFA's leading space."""
    if not text or not text.strip():
        raise ValueError("the instruction is empty")
    return text if text.startswith(" ") else " " + text


def parse_free(tokens: Sequence[int], vocab: Vocab, size: Size) -> dict:
    """Everything an unconstrained output holds: its text (subwords only), boxes (each run of bins
    read 4 at a time, in the `size` frame) and image codes. Nothing is rejected except ids outside
    the vocabulary; bins left over from a run that is not a multiple of 4 come back as `stray_bins`."""
    ids = [int(t) for t in tokens]
    bad = [t for t in ids if not 0 <= t < len(vocab)]
    if bad:
        raise ParseError(f"token ids out of the vocabulary [0, {len(vocab)}): {bad[:8]}")
    w, h = size
    frames = (w, h, w, h)
    boxes, stray, run = [], [], []
    for t in [*ids, EOS]:  # the sentinel ends the last run of bins
        if vocab.is_bin(t):
            run.append(t - vocab.bin_offset)
            continue
        whole = len(run) - len(run) % 4
        for i in range(0, whole, 4):
            boxes.append(
                [dequantize(b, s, vocab.num_bins) for b, s in zip(run[i : i + 4], frames, strict=True)]
            )
        stray.extend(run[whole:])
        run = []
    return {
        "text": _clean(vocab.decode([t for t in ids if not (vocab.is_bin(t) or vocab.is_code(t))])),
        "boxes": boxes,
        "codes": [t - vocab.code_offset for t in ids if vocab.is_code(t)],
        "stray_bins": stray,
    }
