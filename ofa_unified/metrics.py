"""Evaluation metrics of every task, on plain python lists.

Each function is silent: the scoring libraries' prints (pycocotools, pycocoevalcap and the Java PTB
tokenizer it runs) are swallowed so that training logs and served responses stay clean.
Boxes are ``[x0, y0, x1, y1]`` (x first) in one pixel frame shared by predictions and ground truth.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import sys
import threading
from collections.abc import Iterator, Sequence

import numpy as np

# The Java tokenizer writes to file descriptor 2 directly; redirecting a descriptor is process-wide,
# so concurrent callers take turns.
_FD_LOCK = threading.Lock()


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """Swallow Python prints and anything child processes write to stderr."""
    with _FD_LOCK, contextlib.redirect_stdout(io.StringIO()):
        sys.stderr.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to evaluate")


# ---------------------------------------------------------------- captioning


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """BLEU-4 and CIDEr (COCO caption protocol: PTB tokenization, corpus-level scores).

    CIDEr's idf weights come from the references of this evaluation set, so it needs several
    images to be meaningful (with one image every n-gram has idf 0 and CIDEr is 0).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    _check_lengths(predictions, references)
    if any(not refs for refs in references):
        raise ValueError("every prediction needs at least one reference caption")
    res = {i: [{"caption": p}] for i, p in enumerate(predictions)}
    gts = {i: [{"caption": r} for r in refs] for i, refs in enumerate(references)}
    with _silenced():
        tokenizer = PTBTokenizer()
        res_tok, gts_tok = tokenizer.tokenize(res), tokenizer.tokenize(gts)
        bleu, _ = Bleu(4).compute_score(gts_tok, res_tok, verbose=0)
        cider, _ = Cider().compute_score(gts_tok, res_tok)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


# ---------------------------------------------------------------- VQA

_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    )
}
_ARTICLES = {"a", "an", "the"}
# Punctuation VQAv2 strips; "." and "'" are handled apart (decimal points, contractions stay).
_PUNCT = set(';/[]"{}()=+\\_-><@`,?!')
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")


def normalize_vqa_answer(answer: str) -> str:
    """VQAv2 answer normalisation: lowercase, punctuation, number words -> digits, no articles.

    Punctuation inside a word becomes a space ("t-shirt" -> "t shirt"), next to a space or at an
    end it is dropped; a period survives only inside a number ("2.5"), a comma inside a number goes.
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _DIGIT_COMMA.sub("", text)
    chars = []
    for i, ch in enumerate(text):
        if ch in _PUNCT:
            before = text[i - 1] if i > 0 else " "
            after = text[i + 1] if i + 1 < len(text) else " "
            chars.append("" if before.isspace() or after.isspace() else " ")
        else:
            chars.append(ch)
    text = _PERIOD.sub("", "".join(chars))
    words = [_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """One question's VQAv2 accuracy: min(#humans who gave it / 3, 1) averaged over the
    leave-one-out subsets of the human answers (10 choose 9 for VQAv2)."""
    if not answers:
        raise ValueError("a VQA question needs at least one human answer")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    matches = sum(g == pred for g in gts)
    # Leaving out answer i removes one match exactly when answer i equals the prediction.
    scores = [min(1.0, (matches - (g == pred)) / 3.0) for g in gts]
    return sum(scores) / len(scores)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean VQAv2 accuracy over questions."""
    _check_lengths(predictions, answers)
    return sum(vqa_score(p, a) for p, a in zip(predictions, answers, strict=True)) / len(predictions)


# ---------------------------------------------------------------- grounding


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x0, y0, x1, y1]`` boxes (continuous coordinates)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union -= inter
    return inter / union if union > 0 else 0.0


def grounding_scores(
    predictions: Sequence[Sequence[float]], targets: Sequence[Sequence[float]], threshold: float = 0.5
) -> dict[str, float]:
    """Acc@threshold (share of predicted boxes with IoU >= threshold, OFA's RefCOCO metric) and mean IoU."""
    _check_lengths(predictions, targets)
    ious = [box_iou(p, t) for p, t in zip(predictions, targets, strict=True)]
    hits = sum(i >= threshold for i in ious)
    return {f"acc@{threshold:g}": hits / len(ious), "miou": sum(ious) / len(ious)}


# ---------------------------------------------------------------- classification / text


def accuracy(predictions: Sequence[str], labels: Sequence[str]) -> float:
    """Share of exact label matches after stripping whitespace and case (ITM, visual entailment)."""
    _check_lengths(predictions, labels)
    return sum(
        p.strip().lower() == t.strip().lower() for p, t in zip(predictions, labels, strict=True)
    ) / len(labels)


def _normalize_text(text: str) -> str:
    return " ".join(text.lower().split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to the reference, ignoring case and whitespace differences."""
    _check_lengths(predictions, references)
    return sum(
        _normalize_text(p) == _normalize_text(r) for p, r in zip(predictions, references, strict=True)
    ) / len(references)


# ---------------------------------------------------------------- detection


def detection_map(
    predictions: Sequence[Sequence[dict]], ground_truth: Sequence[Sequence[dict]]
) -> dict[str, float]:
    """COCO mAP@0.5 and mAP@[.5:.95] with pycocotools' COCOeval.

    One list of objects per image, each ``{"box": [x0, y0, x1, y1], "label": str}``; predicted objects
    may carry a ``"score"`` (default 1.0: a generated sequence has no per-object confidence).
    Labels become category ids; a category with no ground-truth object is left out of the mean, as COCO does.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    _check_lengths(predictions, ground_truth)
    labels = sorted({o["label"] for objs in [*ground_truth, *predictions] for o in objs})
    cat_id = {label: i + 1 for i, label in enumerate(labels)}

    def xywh(box: Sequence[float]) -> list[float]:
        return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]

    images, annotations = [], []
    for image_id, objs in enumerate(ground_truth, start=1):
        images.append({"id": image_id})
        for o in objs:
            bbox = xywh(o["box"])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat_id[o["label"]],
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                }
            )
    if not annotations:
        raise ValueError("detection mAP needs at least one ground-truth object")
    detections = [
        {
            "image_id": image_id,
            "category_id": cat_id[o["label"]],
            "bbox": xywh(o["box"]),
            "score": float(o.get("score", 1.0)),
        }
        for image_id, objs in enumerate(predictions, start=1)
        for o in objs
    ]
    if not detections:
        return {"map@0.5": 0.0, "map@[.5:.95]": 0.0}
    with _silenced():
        gt = COCO()
        gt.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i, "name": label} for label, i in cat_id.items()],
        }
        gt.createIndex()
        dt = gt.loadRes(detections)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # stats[0] is AP@[.5:.95], stats[1] AP@.5; -1 means "nothing to evaluate", which counts as 0.
    ap_50_95, ap_50 = (max(0.0, float(v)) for v in evaluator.stats[:2])
    return {"map@0.5": ap_50, "map@[.5:.95]": ap_50_95}


# ---------------------------------------------------------------- image outputs


def code_accuracy(predictions: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> float:
    """Share of target image-code positions predicted exactly, pooled over all samples
    (a prediction that is too short counts its missing positions as wrong)."""
    _check_lengths(predictions, targets)
    total = sum(len(t) for t in targets)
    if total == 0:
        raise ValueError("targets hold no image codes")
    hits = sum(
        sum(p == t for p, t in zip(pred, tgt, strict=False))
        for pred, tgt in zip(predictions, targets, strict=True)
    )
    return hits / total


def psnr(prediction, target, max_value: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of two same-shaped images (arrays or PIL images); inf if equal."""
    a = np.asarray(prediction, dtype=np.float64)
    b = np.asarray(target, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(max_value**2 / mse)
