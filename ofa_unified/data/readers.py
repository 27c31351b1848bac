"""Readers that turn real dataset files into samples of the project's record schema.

Iterating a reader yields `(PIL RGB image, record)` lazily: an image is decoded only when its sample
is reached. `reader.records()` yields `Sample`s (record, location, `load_image()`) without decoding
anything, for filtering or counting. Boxes in records are `[x0, y0, x1, y1]` in pixels of the
original image (x first), whatever the source format uses.

A malformed entry raises `DataError`, whose message starts with the file and the line (TSV, JSONL)
or the entry index and id (JSON) and says what is wrong. With `skip_bad=True` the entry is left out
instead, logged as a warning, counted in `reader.skipped` (reset on each pass) and summarised at the
end of the pass. Whole-file problems (not JSON at all, a missing file) always raise. When images
are decoded, every box must lie inside the image (up to `BOX_TOLERANCE` pixels, then clamped), and
COCO-style width/height must match the decoded image, so swapped or xywh/xyxy-confused boxes are
caught rather than trained on.

Formats (class: what it reads):
- `OFATsvReader`: OFA's TSV files, one sample per line, image as base64 (standard or URL-safe
  alphabet). Column layouts (`task=`), as in OFA's README and dataset code:
    caption:   uniq_id, image_id, caption ("&&"-joined references allowed), predicted objects, image
    vqa:       question_id, image_id, question, answers ("conf|!+answer&&..."), predicted objects, image
    refcoco:   uniq_id, image_id, text, "x0,y0,x1,y1", image            (alias: grounding)
    snli_ve:   uniq_id, image_id, image, hypothesis, premise, label      (alias: visual_entailment)
    detection: uniq_id, image, "x0,y0,x1,y1,cat_id,name&&..."           (OFA pretraining detection)
  A row must have exactly that many columns unless `columns=` is given: either OFA's `selected_cols`
  (e.g. "0,4,2,3"; field order caption: id,image,caption; vqa: id,image,question,answers,objects;
  refcoco: id,image,text,box; snli_ve: id,image,hypothesis,premise,label; detection: id,image,objects)
  or a mapping {field: column}. VQA records carry `answers` sorted by confidence (best first) and
  `answer_scores` {answer: confidence}; the predicted-object columns are not used.
- `CocoCaptionReader`: COCO caption JSON (`images` + `annotations`), one caption record per image
  with all its captions; images without captions are left out (counted in a warning).
- `VQAv2Reader`: VQAv2 questions JSON + annotations JSON (optional, e.g. for test-dev), records with
  the 10 human answers; image files named by `image_pattern` (default COCO's
  "COCO_{data_subtype}_{image_id:012d}.jpg", or "{image_id:012d}.jpg" when the questions file has no
  data_subtype).
- `RefExpReader`: referring expressions as JSON (a list, or an object with a "refs" list) or JSONL
  (one entry per line). Entry: {"image" or "file_name": path, "bbox": [x, y, w, h] (COCO xywh;
  `box_format="xyxy"` for corner boxes), "sentences": [str | {"sent": str} | {"raw": str}, ...]
  (or one "text"), optional "ref_id"/"id", "image_id", "split"}. One grounding record per sentence,
  id "{ref_id}_{k}". Image paths are resolved against `image_dir` (default: the file's folder).
  `split=` keeps entries of one split (RefCOCO's train/val/testA/testB). The original refer
  `refs(unc).p` is a pickle, which this library does not load: convert it to this JSON form.
- `CocoDetectionReader`: COCO instances JSON; bbox xywh -> xyxy, category names as labels, iscrowd
  regions skipped (they are not single objects; COCO evaluation ignores them too). A bad annotation
  invalidates its whole image (a partial object list would be silently wrong ground truth).
- `JsonlReader`: one record per line, `{"image": path, "task": ..., ...fields}` in the record schema
  (see `validate_record`); relative image paths are resolved against the JSONL file's folder.
Blank lines in TSV/JSONL files are ignored. JSON files are parsed again on each pass; materialise
`list(reader.records())` to reuse the parsed samples.

Spec grammar of `open_dataset` (so a config names a data source as one string):
    SPEC    := FORMAT ":" ARG (":" ARG)* ["?" OPTION ("&" OPTION)*]
    OPTION  := NAME "=" VALUE          (booleans: true/false/1/0/yes/no)
    jsonl:PATH
    tsv:TASK:PATH                      e.g. tsv:caption:data/caption_val.tsv?columns=1,4,2
    coco_caption:ANNOTATIONS_JSON:IMAGE_DIR
    vqav2:QUESTIONS_JSON:[ANNOTATIONS_JSON]:IMAGE_DIR     (empty annotations for a test split)
    refexp:PATH[:IMAGE_DIR]            e.g. refexp:refcoco.json:coco/train2014?split=testA
    coco_detection:ANNOTATIONS_JSON:IMAGE_DIR
Options are the reader's keyword arguments (skip_bad, max_pixels, columns, split, box_format,
image_pattern, skip_empty). Paths must not contain ":" or "?". The dict form names the same
arguments: {"format": "tsv", "task": "vqa", "path": "...", "skip_bad": true}.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import json
import logging
import math
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from ofa_unified.data.preprocess import DEFAULT_MAX_PIXELS, ImageError, load_image
from ofa_unified.tasks import list_tasks

__all__ = [
    "BOX_TOLERANCE",
    "CocoCaptionReader",
    "CocoDetectionReader",
    "DataError",
    "JsonlReader",
    "OFATsvReader",
    "Reader",
    "RefExpReader",
    "Sample",
    "VQAv2Reader",
    "open_dataset",
    "validate_record",
    "xywh_to_xyxy",
]

logger = logging.getLogger(__name__)


# Boxes may overshoot the image by this many pixels (rounding in annotation tools) and are then clamped;
# anything further out is an error.
BOX_TOLERANCE = 2.0


class DataError(ValueError):
    """A malformed dataset entry; the message starts with where it is (file:line or file: entry)."""

    def __init__(self, location: str, reason: str) -> None:
        self.location, self.reason = location, reason
        super().__init__(f"{location}: {reason}")


@dataclass
class Sample:
    """One record plus how to get its image; `location` names the entry in error messages."""

    record: dict
    location: str
    loader: Callable[[], Image.Image]
    expected_size: tuple[int, int] | None = None  # (W, H) the annotation file claims, if it says

    def load_image(self) -> Image.Image:
        return self.loader()


# ----------------------------------------------------------------------------------------------------------
# record validation


def xywh_to_xyxy(bbox: Sequence[float]) -> list[float]:
    """COCO [x, y, w, h] -> [x0, y0, x1, y1]; negative width/height is an error."""
    x, y, w, h = _numbers(bbox, 4, "bbox")
    if w < 0 or h < 0:
        raise ValueError(f"bbox {list(bbox)} has a negative width or height")
    return [x, y, x + w, y + h]


def _numbers(value: Any, n: int, what: str) -> list[float]:
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != n:
        raise ValueError(f"{what} must be a list of {n} numbers, got {value!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{what} must be a list of {n} numbers, got {value!r}")
    out = [float(v) for v in value]
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what} {value!r} has a non-finite number")
    return out


def _check_box(value: Any, what: str = "box") -> list[float]:
    box = _numbers(value, 4, what)
    if box[2] < box[0]:
        raise ValueError(f"{what} {box} has x1 < x0 (expected [x0, y0, x1, y1])")
    if box[3] < box[1]:
        raise ValueError(f"{what} {box} has y1 < y0 (expected [x0, y0, x1, y1])")
    return box


def _str(rec: dict, key: str) -> str:
    value = rec.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"missing field {key!r} (a non-empty string)"
            if value is None
            else f"{key!r} must be a non-empty string, got {value!r}"
        )
    return value


def _str_list(rec: dict, key: str, allow_empty: bool = False) -> list[str]:
    value = rec.get(key)
    if value is None:
        raise ValueError(f"missing field {key!r} (a list of strings)")
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"{key!r} must be a list of non-empty strings, got {value!r}")
    if not value and not allow_empty:
        raise ValueError(f"{key!r} is empty")
    return value


def _label(rec: dict, key: str, allowed: tuple[str, ...]) -> str:
    value = _str(rec, key)
    if value not in allowed:
        raise ValueError(f"{key!r} must be one of {allowed}, got {value!r}")
    return value


def validate_record(record: Mapping[str, Any]) -> dict:
    """Check a record against the schema of its task and return a normalised copy (ValueError if wrong).

    Normalisations: caption `caption: str` -> `captions: [str]`; vqa `answer: str` -> `answers: [str]`;
    boxes become lists of floats.
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    rec = dict(record)
    task = rec.get("task")
    if task not in list_tasks():
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(list_tasks())}")
    if task == "caption":
        if "captions" not in rec and isinstance(rec.get("caption"), str):
            rec["captions"] = [rec.pop("caption")]
        _str_list(rec, "captions")
    elif task == "vqa":
        _str(rec, "question")
        if "answers" not in rec and isinstance(rec.get("answer"), str):
            rec["answers"] = [rec.pop("answer")]
        _str_list(rec, "answers", allow_empty=True)
        if "candidates" in rec:
            _str_list(rec, "candidates")
    elif task in ("grounding", "grounded_caption"):
        _str(rec, "text")
        rec["box"] = _check_box(rec.get("box"))
        if "texts" in rec:
            _str_list(rec, "texts")
    elif task == "itm":
        _str(rec, "text")
        _label(rec, "label", ("yes", "no"))
    elif task == "detection":
        objects = rec.get("objects")
        if not isinstance(objects, list):
            raise ValueError(f"'objects' must be a list of {{'box', 'label'}}, got {objects!r}")
        checked = []
        for i, obj in enumerate(objects):
            if not isinstance(obj, Mapping):
                raise ValueError(f"objects[{i}] must be an object with 'box' and 'label', got {obj!r}")
            label = _str(dict(obj), "label")
            checked.append({**obj, "box": _check_box(obj.get("box"), f"objects[{i}].box"), "label": label})
        rec["objects"] = checked
    elif task == "text_infilling":
        _str(rec, "text")
        if "masked_text" in rec:
            _str(rec, "masked_text")
    elif task == "visual_entailment":
        _str(rec, "text1")
        _str(rec, "text2")
        _label(rec, "label", ("yes", "no", "maybe"))
    elif task == "text_to_image":
        _str(rec, "caption")
    elif task == "itc":
        _str(rec, "text")
    elif task == "prefix_lm":
        _str(rec, "text")
        if not isinstance(rec.get("text_only", False), bool):  # true: the encoder sees no image
            raise ValueError(f"'text_only' must be true or false, got {rec['text_only']!r}")
    return rec


def _record_boxes(record: dict) -> Iterator[tuple[dict, str]]:
    """(container, key) of every box in a record, so boxes can be clamped in place."""
    if "box" in record:
        yield record, "box"
    for obj in record.get("objects") or ():
        yield obj, "box"


def _fit_boxes(sample: Sample, size: tuple[int, int]) -> None:
    """Boxes must lie inside the decoded image (within BOX_TOLERANCE); clamp the small overshoots."""
    w, h = size
    if sample.expected_size is not None and tuple(sample.expected_size) != (w, h):
        ew, eh = sample.expected_size
        raise DataError(sample.location, f"image is {w}x{h} but the annotation file says {ew}x{eh}")
    for holder, key in _record_boxes(sample.record):
        x0, y0, x1, y1 = holder[key]
        t = BOX_TOLERANCE
        if x0 < -t or y0 < -t or x1 > w + t or y1 > h + t:
            raise DataError(sample.location, f"box {holder[key]} lies outside the {w}x{h} image")
        holder[key] = [min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w), min(max(y1, 0.0), h)]


# ----------------------------------------------------------------------------------------------------------
# image loaders


def _file_loader(path: Path, location: str, max_pixels: int) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        try:
            return load_image(path, max_pixels)
        except FileNotFoundError:
            raise DataError(location, f"image file not found: {path}") from None
        except ImageError as e:
            raise DataError(location, f"undecodable image {path}: {e}") from e
        except OSError as e:
            raise DataError(location, f"cannot read image {path}: {e}") from e

    return load


def _b64decode(text: str) -> bytes:
    """OFA writes standard base64 and reads URL-safe; accept both alphabets, reject anything else."""
    s = text.strip().replace("-", "+").replace("_", "/")
    if not s:
        raise ValueError("empty string")
    s += "=" * (-len(s) % 4)
    return base64.b64decode(s, validate=True)


def _b64_loader(text: str, location: str, column: int, max_pixels: int) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        try:
            data = _b64decode(text)
        except (binascii.Error, ValueError) as e:
            raise DataError(location, f"bad base64 in column {column}: {e}") from None
        try:
            return load_image(data, max_pixels)
        except ImageError as e:
            raise DataError(location, f"undecodable image in column {column}: {e}") from e

    return load


# ----------------------------------------------------------------------------------------------------------
# readers


class Reader:
    """Base: subclasses yield Samples or DataErrors from `_entries`; this class raises or skips them."""

    format: ClassVar[str]

    def __init__(self, *, skip_bad: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.skip_bad, self.max_pixels = skip_bad, max_pixels
        self.skipped = 0

    @property
    def source(self) -> str:
        raise NotImplementedError

    def _entries(self) -> Iterator[Sample | DataError]:
        raise NotImplementedError

    def records(self) -> Iterator[Sample]:
        """Samples without decoding images (image errors then surface only in `Sample.load_image`)."""
        for item in self._pass(load_images=False):
            yield item[1]

    def __iter__(self) -> Iterator[tuple[Image.Image, dict]]:
        for image, sample in self._pass(load_images=True):
            yield image, sample.record

    def _pass(self, load_images: bool) -> Iterator[tuple[Image.Image | None, Sample]]:
        self.skipped = kept = 0
        for item in self._entries():
            image = None
            if not isinstance(item, DataError) and load_images:
                try:
                    image = item.load_image()
                    _fit_boxes(item, image.size)
                except DataError as e:
                    item = e
            if isinstance(item, DataError):
                if not self.skip_bad:
                    raise item
                self.skipped += 1
                logger.warning("%s (skipped)", item)
                continue
            kept += 1
            yield image, item
        if self.skipped:
            logger.warning("%s: skipped %d bad entries, kept %d", self.source, self.skipped, kept)


def _lines(path: Path) -> Iterator[tuple[str, str | DataError]]:
    """(location, text or DataError) per non-blank line; decoded per line, so a bad byte costs one line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            location = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield location, DataError(location, f"not UTF-8 text: {e}")
                continue
            if line.strip():
                yield location, line


def _load_json(path: Path) -> Any:
    with open(path, "rb") as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(str(path), f"not valid JSON: {e}") from None


def _json_list(data: Any, key: str, path: Path) -> list:
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, list):
        raise DataError(str(path), f"expected a JSON object with a {key!r} list")
    return value


def _where(path: Path, key: str, index: int, entry: Any, id_key: str = "id") -> str:
    eid = entry.get(id_key) if isinstance(entry, dict) else None
    return f"{path}: {key}[{index}]" + (f" ({id_key} {eid})" if eid is not None else "")


def _require(entry: Any, *keys: str) -> dict:
    """Entry must be an object with `keys`; identifiers (keys ending in "id") must be int or str."""
    if not isinstance(entry, dict):
        raise ValueError(f"expected a JSON object, got {entry!r:.80}")
    for key in keys:
        value = entry.get(key)
        if value is None:
            raise ValueError(f"missing field {key!r}")
        if key.endswith("id") and (isinstance(value, bool) or not isinstance(value, (int, str))):
            raise ValueError(f"{key!r} must be an integer or a string, got {value!r:.80}")
    return entry


class JsonlReader(Reader):
    """Plain JSONL: `{"image": path, "task": ..., ...}` per line, in the record schema."""

    format = "jsonl"

    def __init__(
        self, path: str | Path, *, skip_bad: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        super().__init__(skip_bad=skip_bad, max_pixels=max_pixels)
        self.path = Path(path)

    @property
    def source(self) -> str:
        return str(self.path)

    def _entries(self) -> Iterator[Sample | DataError]:
        for location, line in _lines(self.path):
            if isinstance(line, DataError):
                yield line
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield DataError(location, f"invalid JSON: {e}")
                continue
            try:
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                image = obj.pop("image", None)
                if not isinstance(image, str) or not image:
                    raise ValueError("missing field 'image' (an image path)")
                record = validate_record(obj)
            except ValueError as e:
                yield DataError(location, str(e))
                continue
            yield Sample(record, location, _file_loader(self.path.parent / image, location, self.max_pixels))


@dataclass(frozen=True)
class _TsvLayout:
    task: str  # record task
    fields: tuple[str, ...]  # column names in file order
    selected: tuple[str, ...]  # field order of OFA's selected_cols
    required: tuple[str, ...]


_TSV_LAYOUTS = {
    "caption": _TsvLayout(
        "caption",
        ("id", "image_id", "caption", "objects", "image"),
        ("id", "image", "caption"),
        ("image", "caption"),
    ),
    "vqa": _TsvLayout(
        "vqa",
        ("id", "image_id", "question", "answers", "objects", "image"),
        ("id", "image", "question", "answers", "objects"),
        ("image", "question", "answers"),
    ),
    "refcoco": _TsvLayout(
        "grounding",
        ("id", "image_id", "text", "box", "image"),
        ("id", "image", "text", "box"),
        ("image", "text", "box"),
    ),
    "snli_ve": _TsvLayout(
        "visual_entailment",
        ("id", "image_id", "image", "hypothesis", "premise", "label"),
        ("id", "image", "hypothesis", "premise", "label"),
        ("image", "hypothesis", "premise", "label"),
    ),
    "detection": _TsvLayout(
        "detection", ("id", "image", "objects"), ("id", "image", "objects"), ("image", "objects")
    ),
}
_TSV_ALIASES = {"grounding": "refcoco", "visual_entailment": "snli_ve"}
_SNLI_LABELS = {
    "entailment": "yes",
    "contradiction": "no",
    "neutral": "maybe",
    "yes": "yes",
    "no": "no",
    "maybe": "maybe",
}


class OFATsvReader(Reader):
    """OFA's TSV files with base64 images; `task` picks the column layout (see the module docstring)."""

    format = "tsv"

    def __init__(
        self,
        task: str,
        path: str | Path,
        *,
        columns: str | Sequence[int] | Mapping[str, int] | None = None,
        skip_bad: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(skip_bad=skip_bad, max_pixels=max_pixels)
        name = _TSV_ALIASES.get(task, task)
        if name not in _TSV_LAYOUTS:
            raise ValueError(f"unknown TSV task {task!r}; known: {', '.join([*_TSV_LAYOUTS, *_TSV_ALIASES])}")
        self.path, self.layout = Path(path), _TSV_LAYOUTS[name]
        self.columns, self.num_columns = self._columns(columns)

    @property
    def source(self) -> str:
        return str(self.path)

    def _columns(
        self, columns: str | Sequence[int] | Mapping[str, int] | None
    ) -> tuple[dict[str, int], int | None]:
        """Field -> column index, and the exact column count a row must have (None: at least enough)."""
        layout = self.layout
        if columns is None:
            mapping = {f: i for i, f in enumerate(layout.fields)}
            if layout.task != "detection":
                mapping.pop("objects", None)  # predicted object labels: not in the record schema
            return mapping, len(layout.fields)
        if isinstance(columns, str):
            try:
                columns = [int(c) for c in columns.split(",")]
            except ValueError:
                raise ValueError(
                    f"columns must be comma-separated integers like '0,4,2', got {columns!r}"
                ) from None
        if isinstance(columns, Mapping):
            mapping = dict(columns)
            unknown = set(mapping) - set(layout.fields)
            if unknown:
                raise ValueError(
                    f"unknown TSV fields {sorted(unknown)} for {layout.task}; fields: {layout.fields}"
                )
        else:
            if len(columns) > len(layout.selected):
                raise ValueError(
                    f"{len(columns)} columns given, the {layout.task} layout selects {layout.selected}"
                )
            mapping = dict(zip(layout.selected, columns, strict=False))
        missing = [f for f in layout.required if f not in mapping]
        if missing:
            raise ValueError(f"columns= lacks the fields {missing} (order: {', '.join(layout.selected)})")
        if layout.task != "detection":
            mapping.pop("objects", None)
        if any(not isinstance(i, int) or i < 0 for i in mapping.values()):
            raise ValueError(f"column indices must be non-negative integers, got {mapping}")
        return mapping, None

    def _entries(self) -> Iterator[Sample | DataError]:
        need = max(self.columns.values()) + 1
        for location, line in _lines(self.path):
            if isinstance(line, DataError):
                yield line
                continue
            cells = line.split("\t")
            if self.num_columns is not None and len(cells) != self.num_columns:
                yield DataError(
                    location,
                    f"wrong column count: expected {self.num_columns} tab-separated columns "
                    f"({', '.join(self.layout.fields)}), got {len(cells)}; pass columns= for other layouts",
                )
                continue
            if len(cells) < need:
                yield DataError(
                    location, f"wrong column count: expected at least {need} columns, got {len(cells)}"
                )
                continue
            row = {f: cells[i] for f, i in self.columns.items()}
            try:
                record = self._record(row)
            except ValueError as e:
                yield DataError(location, str(e))
                continue
            loader = _b64_loader(row["image"], location, self.columns["image"], self.max_pixels)
            yield Sample(record, location, loader)

    def _record(self, row: dict[str, str]) -> dict:
        task = self.layout.task
        record: dict[str, Any] = {"task": task}
        if task == "caption":
            record["captions"] = [c.strip() for c in row["caption"].split("&&")]
        elif task == "vqa":
            record["question"] = row["question"].strip()
            scores = _vqa_answers(row["answers"])
            record["answers"] = sorted(scores, key=lambda a: -scores[a])
            record["answer_scores"] = scores
        elif task == "grounding":
            record["text"] = row["text"].strip()
            record["box"] = _check_box(_csv_numbers(row["box"], 4, "box"))
        elif task == "visual_entailment":
            label = row["label"].strip()
            if label not in _SNLI_LABELS:
                raise ValueError(f"unknown label {label!r}; expected one of {sorted(_SNLI_LABELS)}")
            record.update(
                text1=row["premise"].strip(), text2=row["hypothesis"].strip(), label=_SNLI_LABELS[label]
            )
        elif task == "detection":
            record["objects"] = _ofa_objects(row["objects"])
        record = validate_record(record)
        if "id" in row:
            record["id"] = row["id"]
        if "image_id" in row:
            record["image_id"] = row["image_id"]
        return record


def _csv_numbers(text: str, n: int, what: str) -> list[float]:
    parts = text.strip().split(",")
    if len(parts) != n:
        raise ValueError(f"{what} must be {n} comma-separated numbers, got {text!r}")
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"{what} must be {n} comma-separated numbers, got {text!r}") from None


def _vqa_answers(text: str) -> dict[str, float]:
    """OFA's "conf|!+answer&&conf|!+answer" -> {answer: conf}; an empty cell (test split) gives {}."""
    scores: dict[str, float] = {}
    for item in filter(None, text.strip().split("&&")):
        conf, sep, answer = item.partition("|!+")
        try:
            value = float(conf)
        except ValueError:
            value = math.nan
        if not sep or not answer.strip() or not math.isfinite(value):
            raise ValueError(f"answer {item!r} is not 'confidence|!+answer'")
        scores[answer.strip()] = value
    return scores


def _ofa_objects(text: str) -> list[dict]:
    """OFA detection cell "x0,y0,x1,y1,category_id,name&&..." -> [{"box", "label"}]."""
    objects = []
    for item in filter(None, text.strip().split("&&")):
        parts = item.strip().split(",", 5)
        if len(parts) != 6 or not parts[5].strip():
            raise ValueError(f"object {item!r} is not 'x0,y0,x1,y1,category_id,name'")
        box = _check_box(_csv_numbers(",".join(parts[:4]), 4, "box"))
        objects.append({"box": box, "label": parts[5].strip()})
    return objects


def _coco_images(path: Path, data: Any) -> Generator[DataError, None, dict[Any, tuple[str, dict]]]:
    """A COCO `images` table by id -> (location, entry); yields an error per bad entry, returns the table."""
    images: dict[Any, tuple[str, dict]] = {}
    for i, img in enumerate(_json_list(data, "images", path)):
        location = _where(path, "images", i, img)
        try:
            _require(img, "id", "file_name")
            _str(img, "file_name")
            if img["id"] in images:
                raise ValueError(f"duplicate image id {img['id']}")
        except ValueError as e:
            yield DataError(location, str(e))
            continue
        images[img["id"]] = (location, img)
    return images


class CocoCaptionReader(Reader):
    """COCO caption JSON -> one caption record per image with all of its captions."""

    format = "coco_caption"

    def __init__(
        self,
        annotations: str | Path,
        image_dir: str | Path,
        *,
        skip_bad: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(skip_bad=skip_bad, max_pixels=max_pixels)
        self.annotations, self.image_dir = Path(annotations), Path(image_dir)

    @property
    def source(self) -> str:
        return str(self.annotations)

    def _entries(self) -> Iterator[Sample | DataError]:
        path = self.annotations
        data = _load_json(path)
        images = yield from _coco_images(path, data)
        captions: dict[Any, list[str]] = {}
        for i, ann in enumerate(_json_list(data, "annotations", path)):
            try:
                _require(ann, "image_id", "caption")
                caption = _str(ann, "caption").strip()
                if ann["image_id"] not in images:
                    raise ValueError(f"image_id {ann['image_id']} is not in 'images'")
            except ValueError as e:
                yield DataError(_where(path, "annotations", i, ann), str(e))
                continue
            captions.setdefault(ann["image_id"], []).append(caption)
        no_captions = 0
        for image_id, (location, img) in images.items():
            if image_id not in captions:
                no_captions += 1
                continue
            record = {
                "task": "caption",
                "captions": captions[image_id],
                "id": str(image_id),
                "image_id": image_id,
            }
            loader = _file_loader(self.image_dir / img["file_name"], location, self.max_pixels)
            yield Sample(record, location, loader, _size(img))
        if no_captions:
            logger.warning("%s: %d images have no captions and were left out", path, no_captions)


def _size(img: dict) -> tuple[int, int] | None:
    w, h = img.get("width"), img.get("height")
    return (w, h) if isinstance(w, int) and isinstance(h, int) else None


class VQAv2Reader(Reader):
    """VQAv2 questions JSON (+ annotations JSON) -> vqa records with the 10 human answers."""

    format = "vqav2"

    def __init__(
        self,
        questions: str | Path,
        annotations: str | Path | None,
        image_dir: str | Path,
        *,
        image_pattern: str | None = None,
        skip_bad: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(skip_bad=skip_bad, max_pixels=max_pixels)
        self.questions, self.image_dir = Path(questions), Path(image_dir)
        self.annotations = Path(annotations) if annotations else None
        self.image_pattern = image_pattern

    @property
    def source(self) -> str:
        return str(self.questions)

    def _entries(self) -> Iterator[Sample | DataError]:
        qdata = _load_json(self.questions)
        subtype = qdata.get("data_subtype") if isinstance(qdata, dict) else None
        pattern = self.image_pattern or (
            "COCO_{data_subtype}_{image_id:012d}.jpg" if subtype else "{image_id:012d}.jpg"
        )
        answers: dict[Any, dict] = {}
        bad_questions: set = set()
        if self.annotations is not None:
            adata = _load_json(self.annotations)
            for i, ann in enumerate(_json_list(adata, "annotations", self.annotations)):
                try:
                    _require(ann, "question_id", "answers")
                    if not isinstance(ann["answers"], list) or not all(
                        isinstance(a, dict) and isinstance(a.get("answer"), str) for a in ann["answers"]
                    ):
                        raise ValueError("'answers' must be a list of {'answer': str, ...}")
                except ValueError as e:
                    yield DataError(_where(self.annotations, "annotations", i, ann, "question_id"), str(e))
                    if isinstance(ann, dict) and ann.get("question_id") is not None:
                        bad_questions.add(ann["question_id"])  # counted once, here
                    continue
                answers[ann["question_id"]] = ann
        for i, q in enumerate(_json_list(qdata, "questions", self.questions)):
            location = _where(self.questions, "questions", i, q, "question_id")
            try:
                _require(q, "question_id", "image_id", "question")
                if q["question_id"] in bad_questions:
                    continue
                question = _str(q, "question")
                if not isinstance(q["image_id"], int):
                    raise ValueError(f"image_id must be an integer, got {q['image_id']!r}")
                record = {"task": "vqa", "question": question, "answers": [], "id": str(q["question_id"])}
                record["image_id"] = q["image_id"]
                if self.annotations is not None:
                    ann = answers.get(q["question_id"])
                    if ann is None:
                        raise ValueError("no annotation for this question_id")
                    record["answers"] = [a["answer"] for a in ann["answers"]]
                    if isinstance(ann.get("answer_type"), str):
                        record["answer_type"] = ann["answer_type"]
                file_name = pattern.format(image_id=q["image_id"], data_subtype=subtype)
            except (ValueError, KeyError) as e:
                yield DataError(location, str(e))
                continue
            yield Sample(
                record, location, _file_loader(self.image_dir / file_name, location, self.max_pixels)
            )


class RefExpReader(Reader):
    """Referring expressions (JSON or JSONL, COCO xywh boxes) -> one grounding record per sentence."""

    format = "refexp"

    def __init__(
        self,
        path: str | Path,
        image_dir: str | Path | None = None,
        *,
        split: str | None = None,
        box_format: str = "xywh",
        skip_bad: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(skip_bad=skip_bad, max_pixels=max_pixels)
        if box_format not in ("xywh", "xyxy"):
            raise ValueError(f"box_format must be 'xywh' or 'xyxy', got {box_format!r}")
        self.path = Path(path)
        self.image_dir = Path(image_dir) if image_dir else self.path.parent
        self.split, self.box_format = split, box_format

    @property
    def source(self) -> str:
        return str(self.path)

    def _raw(self) -> Iterator[tuple[str, Any]]:
        if self.path.suffix == ".jsonl":
            for location, line in _lines(self.path):
                if isinstance(line, DataError):
                    yield location, line
                    continue
                try:
                    yield location, json.loads(line)
                except json.JSONDecodeError as e:
                    yield location, DataError(location, f"invalid JSON: {e}")
            return
        data = _load_json(self.path)
        entries = data if isinstance(data, list) else _json_list(data, "refs", self.path)
        for i, entry in enumerate(entries):
            id_key = "ref_id" if isinstance(entry, dict) and "ref_id" in entry else "id"
            yield _where(self.path, "refs", i, entry, id_key), entry

    def _entries(self) -> Iterator[Sample | DataError]:
        for index, (location, entry) in enumerate(self._raw()):
            if isinstance(entry, DataError):
                yield entry
                continue
            try:
                _require(entry)
                if self.split is not None:
                    if not isinstance(entry.get("split"), str):
                        raise ValueError(f"no 'split' field to select split {self.split!r} by")
                    if entry["split"] != self.split:
                        continue
                image = entry.get("image", entry.get("file_name"))
                if not isinstance(image, str) or not image:
                    raise ValueError("missing field 'image' (or 'file_name')")
                _require(entry, "bbox")
                bbox = entry["bbox"]
                box = xywh_to_xyxy(bbox) if self.box_format == "xywh" else _check_box(bbox, "bbox")
                sentences = _sentences(entry)
            except ValueError as e:
                yield DataError(location, str(e))
                continue
            ref_id = entry.get("ref_id", entry.get("id", index))
            loader = _file_loader(self.image_dir / image, location, self.max_pixels)
            for k, text in enumerate(sentences):
                record = {"task": "grounding", "text": text, "box": list(box), "id": f"{ref_id}_{k}"}
                if entry.get("image_id") is not None:
                    record["image_id"] = entry["image_id"]
                yield Sample(record, location, loader)


def _sentences(entry: dict) -> list[str]:
    if "sentences" not in entry:
        text = entry.get("text", entry.get("sentence"))
        if not isinstance(text, str) or not text.strip():
            raise ValueError("missing field 'sentences' (or 'text')")
        return [text.strip()]
    sentences = entry["sentences"]
    if not isinstance(sentences, list) or not sentences:
        raise ValueError(f"'sentences' must be a non-empty list, got {sentences!r:.80}")
    out = []
    for s in sentences:
        text = s if isinstance(s, str) else s.get("sent", s.get("raw")) if isinstance(s, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"sentence {s!r:.80} is not a string or {{'sent': str}}")
        out.append(text.strip())
    return out


class CocoDetectionReader(Reader):
    """COCO instances JSON -> one detection record per image (xyxy boxes, category names as labels)."""

    format = "coco_detection"

    def __init__(
        self,
        annotations: str | Path,
        image_dir: str | Path,
        *,
        skip_empty: bool = False,
        skip_bad: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(skip_bad=skip_bad, max_pixels=max_pixels)
        self.annotations, self.image_dir, self.skip_empty = Path(annotations), Path(image_dir), skip_empty

    @property
    def source(self) -> str:
        return str(self.annotations)

    def _entries(self) -> Iterator[Sample | DataError]:
        path = self.annotations
        data = _load_json(path)
        categories: dict[Any, str] = {}
        for i, cat in enumerate(_json_list(data, "categories", path)):
            try:
                _require(cat, "id", "name")
                categories[cat["id"]] = _str(cat, "name")
            except ValueError as e:
                raise DataError(
                    _where(path, "categories", i, cat), str(e)
                ) from None  # every image depends on it
        images = yield from _coco_images(path, data)
        objects: dict[Any, list[dict]] = {image_id: [] for image_id in images}
        bad: dict[Any, DataError] = {}
        for i, ann in enumerate(_json_list(data, "annotations", path)):
            location = _where(path, "annotations", i, ann)
            try:
                _require(ann, "image_id", "bbox", "category_id")
                if ann["image_id"] not in images:
                    raise ValueError(f"image_id {ann['image_id']} is not in 'images'")
                if ann.get("iscrowd"):
                    continue
                if ann["category_id"] not in categories:
                    raise ValueError(f"category_id {ann['category_id']} is not in 'categories'")
                box = xywh_to_xyxy(ann["bbox"])
            except ValueError as e:
                error = DataError(location, str(e))
                image_id = ann.get("image_id") if isinstance(ann, dict) else None
                if isinstance(image_id, (int, str)) and image_id in images:
                    bad.setdefault(image_id, error)  # the image's object list would be incomplete
                else:
                    yield error
                continue
            objects[ann["image_id"]].append({"box": box, "label": categories[ann["category_id"]]})
        for image_id, (location, img) in images.items():
            if image_id in bad:
                yield bad[image_id]
                continue
            if self.skip_empty and not objects[image_id]:
                continue
            record = {
                "task": "detection",
                "objects": objects[image_id],
                "id": str(image_id),
                "image_id": image_id,
            }
            loader = _file_loader(self.image_dir / img["file_name"], location, self.max_pixels)
            yield Sample(record, location, loader, _size(img))


# ----------------------------------------------------------------------------------------------------------
# factory

_READERS: dict[str, type[Reader]] = {
    cls.format: cls
    for cls in (JsonlReader, OFATsvReader, CocoCaptionReader, VQAv2Reader, RefExpReader, CocoDetectionReader)
}
_BOOL_OPTIONS = {"skip_bad", "skip_empty"}
_INT_OPTIONS = {"max_pixels"}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _option(name: str, value: str) -> Any:
    if name in _BOOL_OPTIONS:
        if value.lower() not in _TRUE | _FALSE:
            raise ValueError(f"option {name} must be true or false, got {value!r}")
        return value.lower() in _TRUE
    if name in _INT_OPTIONS:
        return int(value)
    return value


def open_dataset(spec: str | Mapping[str, Any], **overrides: Any) -> Reader:
    """Build a reader from a spec string or dict (grammar in the module docstring); `overrides` win."""
    if isinstance(spec, str):
        head, _, query = spec.partition("?")
        fmt, *args = head.split(":")
        cls = _reader_class(fmt, spec)
        positional = [p for p in _params(cls) if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        required = [p for p in positional if p.default is inspect.Parameter.empty]
        if not len(required) <= len(args) <= len(positional):
            usage = ":".join(
                [fmt, *(p.name.upper() if p in required else f"[{p.name.upper()}]" for p in positional)]
            )
            raise ValueError(f"bad dataset spec {spec!r}: expected {usage}")
        kwargs: dict[str, Any] = {p.name: (a or None) for p, a in zip(positional, args, strict=False)}
        for item in filter(None, query.split("&")):
            name, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"bad option {item!r} in dataset spec {spec!r}: expected NAME=VALUE")
            kwargs[name] = _option(name, value)
    else:
        kwargs = dict(spec)
        cls = _reader_class(kwargs.pop("format", None), spec)
    kwargs.update(overrides)
    params = _params(cls)
    unknown = sorted(set(kwargs) - {p.name for p in params})
    if unknown:
        accepted = ", ".join(p.name for p in params)
        raise ValueError(f"unknown options {unknown} for {cls.format} (accepted: {accepted})")
    missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in kwargs]
    if missing:
        raise ValueError(f"dataset spec {spec!r} lacks {missing} for {cls.format}")
    return cls(**kwargs)


def _reader_class(fmt: Any, spec: Any) -> type[Reader]:
    if fmt not in _READERS:
        raise ValueError(f"unknown dataset format {fmt!r} in {spec!r}; known: {', '.join(_READERS)}")
    return _READERS[fmt]


def _params(cls: type[Reader]) -> list[inspect.Parameter]:
    return list(inspect.signature(cls.__init__).parameters.values())[1:]
