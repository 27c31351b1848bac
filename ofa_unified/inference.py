"""Inference: requests (image + task fields, or a free instruction) in, structured results out.

The predict CLI, `train/evaluate.py` and the server all go through `Predictor.predict`, so a
task is built, constrained and parsed the same way everywhere. Requests that share decoding
settings run as one batched `generate` over one encoder pass. A request may carry a
`TokenListener`: it receives the request's tokens as they are decoded (greedy, or one sample) and
can take the request out of its batch mid-way (the server streams answers and drops the rows of
clients that went away).

A model with a retrieval head (`itc_dim > 0`) also embeds images and texts into one space
(`embed_images`, `embed_texts`) and ranks candidates by it (`rank`), optionally re-scoring the top
few with the fusion model's ITM answer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import torch
from PIL import Image

from ofa_unified.checkpoint import load_checkpoint
from ofa_unified.data.preprocess import ImageTransform
from ofa_unified.generate import (
    Decoding,
    GenerationConfig,
    Hypothesis,
    Step,
    StepwiseBatch,
    score_candidates,
)
from ofa_unified.model import PAD_ID, OFAModel
from ofa_unified.quantize import check_quantize, quantize_model
from ofa_unified.tasks import (
    ParseError,
    Task,
    answer_trie,
    encode_answer,
    evidence_constraint,
    get_task,
    instruction_source,
    parse_free,
    split_evidence,
)
from ofa_unified.vocab import Vocab
from ofa_unified.vq import encoder_codes

VQ_DIR = "vq"  # a VQ tokenizer bundled inside the checkpoint directory enables image outputs
FREE_DEFAULTS = {"beam_size": 5, "max_new_tokens": 32, "no_repeat_ngram_size": 3}
NO_RETRIEVAL_HEAD = "this model has no retrieval head (itc_dim=0)"
EMBED_BATCH_SIZE = 64  # images or texts per embedding forward pass
ITM_BATCH_SIZE = 16  # (image, text) pairs per ITM scoring pass


class TokenListener(Protocol):
    """Follows one request through decoding, on the thread that runs the model. With `streaming`,
    `tokens` gets each step's new token ids and the answer's `text` so far (read as the result's
    `text` is), when the decoding streams: greedy, or one sample (beam search's answer is known only
    at its end, so it sends none). `cancelled` turning true takes the request out of its batch at
    the next step; its result is then `{"task", "cancelled": True}`."""

    cancelled: bool
    streaming: bool

    def tokens(self, ids: list[int], text: str) -> None: ...


@dataclass
class Request:
    image: Image.Image | None
    task: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    instruction: str | None = None
    candidates: list[str] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    listener: TokenListener | None = field(default=None, repr=False, compare=False)


@dataclass
class _Prepared:
    request: Request
    task: Task | None
    record: dict
    size: tuple[int, int]
    source_ids: list[int]
    image: torch.Tensor
    has_image: bool
    code_output: bool
    config: GenerationConfig
    constraint: Any
    candidates: list[str] | None
    mean_image: bool = False


def max_tokens(p: _Prepared) -> int:
    """The length at which decoding forces eos: max_new_tokens, or a constraint's longest path."""
    return max(p.config.max_new_tokens, getattr(p.constraint, "max_tokens", None) or 0)


def split_options(task: Task | None, options: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """A request's options as (mean_image, GenerationConfig overrides). `mean_image` is not a decoding
    setting: it says how an image task's samples become one picture (default: the task's)."""
    rest = dict(options)
    mean_image = rest.pop("mean_image", getattr(task, "mean_image", False))
    if not isinstance(mean_image, bool):
        raise ValueError(f"mean_image must be true or false, got {mean_image!r}")
    if mean_image and not (task is not None and task.output == "codes"):
        raise ValueError("mean_image applies to tasks that write images (image codes)")
    return mean_image, rest


class Predictor:
    """A loaded model with its vocabulary, image transform and (optionally) VQ tokenizer."""

    def __init__(
        self,
        model: OFAModel,
        vocab: Vocab,
        device: str | torch.device = "cpu",
        vq=None,
        image_size: int | None = None,
        max_source_tokens: int | None = None,
        quantize: str = "none",
    ):
        """`quantize="int8"`: run a dynamically int8-quantized copy of the model (CPU only; the
        speed and accuracy it trades are in bench/README.md, "int8 and ONNX on the CPU")."""
        self.quantize = check_quantize(quantize)
        self.model = quantize_model(model.to(device).eval(), quantize)
        self.vocab = vocab
        self.device = torch.device(device)
        self.vq = vq.to(device).eval() if vq is not None else None
        if model.config.image_tokens and vq is None:
            raise ValueError("this model reads images as VQ codes (image_tokens=True): pass its VQ tokenizer")
        self.image_size = image_size or model.config.patch_image_size
        self.transform = ImageTransform(self.image_size)
        self.max_source_tokens = max_source_tokens or model.config.max_positions
        self.evidence = model.config.answer_evidence  # verdicts come after their evidence

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", **kwargs) -> Predictor:
        loaded = load_checkpoint(path, device=device)
        vq = None
        vq_dir = Path(path) / VQ_DIR
        if vq_dir.is_dir():
            from ofa_unified.vq import VQTokenizer

            vq = VQTokenizer.load(vq_dir, map_location=device)
        return cls(loaded.model, loaded.vocab, device=device, vq=vq, **kwargs)

    def code_grid(self, task: str) -> int:
        """Side of the code grid an image task writes: infilling the middle half of the input image,
        text-to-image the model's `code_grid_size` (its decoder positions cover that grid)."""
        if task == "image_infilling":
            return (self.image_size // 2) // self.vq.config.downsample
        return self.model.config.code_grid_size

    # -- request preparation -------------------------------------------------------------------

    def _prepare(self, req: Request) -> _Prepared:
        if (req.task is None) == (req.instruction is None):
            raise ValueError("give either a task or an instruction (exactly one)")
        task = get_task(req.task) if req.task is not None else None
        if task is not None and task.output == "embedding":
            raise ValueError(
                f"task {task.name} embeds an image and a text and decodes nothing: use embed_images, "
                "embed_texts or rank"
            )
        record = {**req.fields, "task": req.task} if task else {}
        code_output = task is not None and task.output == "codes"
        if code_output and self.vq is None:
            raise ValueError(
                f"task {task.name} writes image codes; this checkpoint has no VQ tokenizer ('{VQ_DIR}/')"
            )
        if code_output:  # the answer's length: the grid this model and tokenizer write
            record.setdefault("code_grid", self.code_grid(task.name))
        needs_image = not (task is not None and task.name == "text_to_image")
        if needs_image and req.image is None:
            raise ValueError(f"{req.task or 'an instruction'} needs an image")
        if req.image is not None and needs_image:
            size = req.image.size
            image, _ = self.transform(req.image)
            if task is not None:
                image = task.encoder_image(image, record)
        else:
            size = (self.image_size, self.image_size)
            image = torch.zeros(3, self.image_size, self.image_size)
        source = task.source(record, size, self.vocab) if task else instruction_source(req.instruction)
        ids = self.vocab.encode(source)
        if len(ids) > self.max_source_tokens:
            raise ValueError(f"the instruction is {len(ids)} tokens; the limit is {self.max_source_tokens}")
        if req.candidates is not None:
            constraint = answer_trie(self.vocab, req.candidates)
        else:
            constraint = task.constraint(self.vocab, record) if task else None
        if self.evidence:
            constraint = evidence_constraint(self.vocab, constraint)
        mean_image, options = split_options(task, req.options)
        defaults = task.generation_kwargs(record) if task else dict(FREE_DEFAULTS)
        config = GenerationConfig(**{**defaults, **options})
        return _Prepared(
            req,
            task,
            record,
            size,
            ids,
            image,
            needs_image and req.image is not None,
            code_output,
            config,
            constraint,
            req.candidates,
            mean_image,
        )

    # -- batched prediction --------------------------------------------------------------------

    @torch.inference_mode()
    def predict(self, requests: list[Request]) -> list[dict]:
        """Results in request order; requests with equal decoding settings share one generate call."""
        prepared = [self._prepare(r) for r in requests]
        results: list[dict | None] = [None] * len(prepared)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(prepared):
            groups.setdefault((repr(p.config), p.code_output), []).append(i)
        for idx in groups.values():
            batch = [prepared[i] for i in idx]
            for i, result in zip(idx, self._run(batch), strict=True):
                results[i] = result
        return results  # type: ignore[return-value]

    def _encode(self, batch: list[_Prepared]):
        width = max(len(p.source_ids) for p in batch)
        ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, : len(p.source_ids)] = torch.tensor(p.source_ids)
        images = torch.stack([p.image for p in batch])
        masks = torch.tensor([p.has_image for p in batch])
        code = torch.tensor([p.code_output for p in batch]).to(self.device)
        images = images.to(self.device)
        return self.model.encode(
            ids.to(self.device),
            images,
            masks.to(self.device),
            code if code.any() else None,
            encoder_codes(self.model.config, self.vq, self.vocab, images, code),
        )

    def _run(self, batch: list[_Prepared]) -> list[dict]:
        group = _Group(self, batch)
        if group.waiting:
            for step in group.decoding:
                group.follow(step)
        else:
            group.decoding.run()
        return group.results()

    def stepwise(self) -> StepwiseSession:
        """A session that decodes requests a step at a time, joining and leaving between steps (the
        server's continuous batching)."""
        return StepwiseSession(self)

    def _results(self, batch: list[_Prepared], enc, hyps: list[list[Hypothesis]]) -> list[dict]:
        seen = (~enc.padding_mask).sum(dim=1).tolist()  # text tokens + image patches per request
        out = [
            self._result(p, h, n) if h else {"task": p.request.task, "cancelled": True}
            for p, h, n in zip(batch, hyps, seen, strict=True)
        ]
        self._add_probabilities(batch, enc, out)
        return out

    def _text(self, p: _Prepared, tokens: list[int]) -> str:
        """The `text` that `_result` gives these tokens: the parser's text where it reads one
        (captions, free instructions: subwords only, single-spaced), else the decoded tokens."""
        if p.candidates is None:
            with contextlib.suppress(ParseError):
                if p.task is None:
                    return parse_free(tokens, self.vocab, p.size)["text"]
                parsed = p.task.parse(tokens, self.vocab, p.size, p.record)
                if "text" in parsed:
                    return parsed["text"]
        return self.vocab.decode(tokens)

    def _result(self, p: _Prepared, hyps: list[Hypothesis], prompt_tokens: int) -> dict:
        """The best hypothesis, parsed; an image task's picture is decoded from it, or with
        `mean_image` is the pixel mean of every hypothesis's picture. `usage` counts the encoder
        positions the model read (text tokens + image patches) and the answer's tokens (no eos), so
        a client can bill or budget by what the model really saw; `hit_max_new_tokens` says eos was
        forced at the length cap (the answer may be cut short)."""
        hyp = hyps[0]
        result: dict[str, Any] = {
            "task": p.task.name if p.task else None,
            "text": self.vocab.decode(hyp.tokens),
            "tokens": hyp.tokens,
            "score": hyp.score,
            "usage": {"prompt_tokens": int(prompt_tokens), "completion_tokens": len(hyp.tokens)},
            "hit_max_new_tokens": not p.code_output and len(hyp.tokens) >= max_tokens(p),
        }
        grids: list[list[int]] = []
        try:
            if p.candidates is not None:
                answer, evidence = hyp.tokens, None
                if self.evidence:
                    answer, evidence = split_evidence(hyp.tokens, self.vocab)
                result["answer"] = self.vocab.decode(answer).strip()
                if evidence is not None:
                    result["evidence"] = self.vocab.decode(evidence).strip()
            elif p.task is None:
                result.update(parse_free(hyp.tokens, self.vocab, p.size))
            else:
                result.update(p.task.parse(hyp.tokens, self.vocab, p.size, p.record))
            if "codes" in result:
                grids = [result["codes"]]
            if grids and p.mean_image:
                grids += [p.task.parse(h.tokens, self.vocab, p.size, p.record)["codes"] for h in hyps[1:]]
                result["images_averaged"] = len(grids)
        except ParseError as e:
            result["parse_error"] = str(e)
            return result
        if p.code_output and grids:
            result["image"] = self._codes_to_image(p, grids)
        return result

    def _add_probabilities(self, batch: list[_Prepared], enc, out: list[dict]) -> None:
        """Closed-set answers get a probability: softmax over every candidate's sequence log-prob."""
        rows = [
            i
            for i, p in enumerate(batch)
            if not {"parse_error", "cancelled"} & set(out[i])
            and (p.candidates is not None or (p.task and p.task.labels))
        ]
        if not rows:
            return
        labels = [
            batch[i].candidates if batch[i].candidates is not None else list(batch[i].task.labels)
            for i in rows
        ]
        # an answer after its evidence is scored after that evidence: the shared prefix's log-prob
        # cancels in the softmax, so this is P(label | image, instruction, evidence)
        prefixes = [self._evidence_prefix(out[i]["tokens"]) for i in rows]
        selected = enc.index_select(torch.tensor(rows, device=self.device))
        for i, probs in zip(rows, self._label_probabilities(selected, labels, prefixes), strict=True):
            out[i]["probabilities"] = probs
            answer = out[i].get("answer")
            if answer in probs:
                out[i]["probability"] = probs[answer]

    def _evidence_prefix(self, tokens: list[int]) -> list[int]:
        """The evidence and separator an answer_evidence model wrote before its answer ([] if none)."""
        if not self.evidence:
            return []
        answer, evidence = split_evidence(tokens, self.vocab)
        return list(tokens[: len(tokens) - len(answer)]) if evidence is not None else []

    def _label_probabilities(
        self, enc, labels: list[list[str]], prefixes: list[list[int]] | None = None
    ) -> list[dict[str, float]]:
        """Each row's softmax over its labels' summed log-probs (OFA's allcand scoring, exact), each
        label after its row's prefix when given."""
        prefixes = prefixes or [[] for _ in labels]
        cands = [
            [prefix + encode_answer(self.vocab, c) for c in names]
            for names, prefix in zip(labels, prefixes, strict=True)
        ]
        out = []
        for names, s in zip(labels, score_candidates(self.model, enc, cands), strict=True):
            top = max(s)
            z = math.fsum(math.exp(v - top) for v in s)
            out.append({n: math.exp(v - top) / z for n, v in zip(names, s, strict=True)})
        return out

    # -- retrieval -----------------------------------------------------------------------------

    @property
    def has_retrieval(self) -> bool:
        """The model embeds images and texts into one space (a contrastive head, `itc_dim > 0`)."""
        return bool(self.model.has_retrieval)

    def _require_retrieval(self) -> None:
        if not self.has_retrieval:
            raise ValueError(NO_RETRIEVAL_HEAD)

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = EMBED_BATCH_SIZE) -> torch.Tensor:
        """[N, itc_dim] unit vectors (float32, on the CPU), one per image, `batch_size` at a time."""
        self._require_retrieval()
        out = [torch.empty(0, self.model.config.itc_dim)]
        for start in range(0, len(images), batch_size):
            pixels = torch.stack([self.transform(im)[0] for im in images[start : start + batch_size]])
            pixels = pixels.to(self.device)
            codes = encoder_codes(self.model.config, self.vq, self.vocab, pixels)
            out.append(self.model.embed(patch_images=pixels, image_codes=codes).float().cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = EMBED_BATCH_SIZE) -> torch.Tensor:
        """[N, itc_dim] unit vectors (float32, on the CPU), one per text, `batch_size` at a time."""
        self._require_retrieval()
        out = [torch.empty(0, self.model.config.itc_dim)]
        for start in range(0, len(texts), batch_size):
            ids = self.text_ids(texts[start : start + batch_size], first=start)
            out.append(self.model.embed(input_ids=ids).float().cpu())
        return torch.cat(out)

    def text_ids(self, texts: Sequence[str], first: int = 0) -> torch.Tensor:
        """[N, L] the texts' ids padded with PAD_ID, on the model's device: what `embed_texts` feeds
        the model (to train its head on the same inputs). `first` numbers the texts in errors."""
        encoded = []
        for i, text in enumerate(texts, start=first):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"text {i} to embed is empty or not a string")
            encoded.append(self.vocab.encode(text))
            if len(encoded[-1]) > self.max_source_tokens:
                raise ValueError(
                    f"text {i} is {len(encoded[-1])} tokens; the limit is {self.max_source_tokens}"
                )
        ids = torch.full((len(encoded), max(map(len, encoded), default=0)), PAD_ID, dtype=torch.long)
        for row, seq in enumerate(encoded):
            ids[row, : len(seq)] = torch.tensor(seq)
        return ids.to(self.device)

    def rank(
        self,
        query: Image.Image | str,
        candidates: Sequence[str] | Sequence[Image.Image],
        rerank: int = 0,
    ) -> list[dict]:
        """Candidates best first, each `{"index", "score", "embedding_score"}` (+ `"text"` for text
        candidates): an image query ranks texts, a text query ranks images, by the cosine of their
        embeddings. `rerank=k` re-scores the top k with the fusion model's ITM P("yes") (`itm_score`,
        then also their `score`) and re-sorts them; they stay ahead of the rest, whose embedding
        score is on another scale."""
        self._require_retrieval()
        if not candidates:
            raise ValueError("no candidates to rank")
        image_query = isinstance(query, Image.Image)
        if not image_query and not isinstance(query, str):
            raise ValueError(f"the query must be a PIL image or a text, got {type(query).__name__}")
        wanted = str if image_query else Image.Image
        if not all(isinstance(c, wanted) for c in candidates):
            raise ValueError("an image query ranks texts and a text query ranks images")
        if image_query:
            sims = self.embed_texts(candidates) @ self.embed_images([query])[0]
        else:
            sims = self.embed_images(candidates) @ self.embed_texts([query])[0]
        ranked = self.ranking(sims.tolist())
        if image_query:
            for r in ranked:
                r["text"] = candidates[r["index"]]

        def pair(i: int) -> tuple[Image.Image, str]:
            return (query, candidates[i]) if image_query else (candidates[i], query)

        return self.rerank(ranked, rerank, pair)

    @staticmethod
    def ranking(scores: Sequence[float]) -> list[dict]:
        """Indices by descending embedding score (ties keep their order)."""
        order = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)
        return [{"index": i, "score": scores[i], "embedding_score": scores[i]} for i in order]

    def rerank(
        self, ranked: list[dict], k: int, pair: Callable[[int], tuple[Image.Image, str]]
    ) -> list[dict]:
        """`ranked` with its top k re-scored by ITM (`pair(index)` is the candidate's (image, text)
        pair with the query) and re-sorted by that score; the rest as they were."""
        if k < 0:
            raise ValueError(f"rerank must be >= 0, got {k}")
        top = [dict(r) for r in ranked[:k]]
        for r, s in zip(top, self.itm_scores([pair(r["index"]) for r in top]), strict=True):
            r["score"] = r["itm_score"] = s
        return sorted(top, key=lambda r: r["score"], reverse=True) + ranked[k:]

    @torch.inference_mode()
    def itm_scores(
        self, pairs: Sequence[tuple[Image.Image, str]], batch_size: int = ITM_BATCH_SIZE
    ) -> list[float]:
        """P("yes") of the itm task for each (image, text): the fusion model's verdict, read off the
        same label scoring as an itm answer's probabilities (no decoding)."""
        labels = list(get_task("itm").labels)
        out: list[float] = []
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            if self.evidence:  # the verdict follows the evidence the model writes first
                results = self.predict([Request(im, "itm", {"text": text}) for im, text in chunk])
                out += [r["probabilities"]["yes"] for r in results]
                continue
            batch = [self._prepare(Request(im, "itm", {"text": text})) for im, text in chunk]
            probs = self._label_probabilities(self._encode(batch), [labels] * len(batch))
            out += [p["yes"] for p in probs]
        return out

    def _codes_to_image(self, p: _Prepared, grids: list[list[int]]) -> Image.Image:
        """Decode code grids to pixels; several grids are averaged in pixel space (their mean is
        the minimum-squared-error picture under the model's samples)."""
        from ofa_unified.vq import paste_middle, tensor_to_pil

        side = p.record["code_grid"]
        grid = torch.tensor(grids, device=self.device).view(len(grids), side, side)
        pixels = self.vq.decode(grid).mean(dim=0).cpu()
        if p.task.name == "image_infilling":
            pixels = paste_middle(p.image, pixels)
        return tensor_to_pil(pixels).resize(p.size, Image.Resampling.BICUBIC)


class _Group:
    """Requests decoded as one `Decoding` over one encoder pass: a streaming listener gets its
    request's new tokens and text (when the search streams) step by step, a request whose listener is
    cancelled leaves the batch, and `results` makes the predictor's results once decoding is over."""

    def __init__(self, predictor: Predictor, batch: list[_Prepared]) -> None:
        self.predictor, self.batch = predictor, batch
        self.enc = predictor._encode(batch)
        prefix = None
        if predictor.model.config.prompt_type == "prev_output":
            prefix = [p.source_ids[1:-1] for p in batch]
        constraints = [p.constraint for p in batch]
        self.decoding = Decoding(predictor.model, self.enc, batch[0].config, constraints, prefix)
        self.waiting = {i: p.request.listener for i, p in enumerate(batch) if p.request.listener is not None}
        self.written: dict[int, list[int]] = {i: [] for i in self.waiting}

    def follow(self, step: Step) -> None:
        if self.decoding.streams:
            for slot, token in step.pairs():
                listener = self.waiting.get(slot)
                if listener is not None and listener.streaming and not listener.cancelled:
                    self.written[slot].append(token)
                    listener.tokens([token], self.predictor._text(self.batch[slot], self.written[slot]))
        gone = [i for i, listener in self.waiting.items() if listener.cancelled]
        if gone:
            self.decoding.cancel(gone)
            for i in gone:
                del self.waiting[i]

    def results(self) -> list[dict]:
        assert self.decoding.results is not None
        return self.predictor._results(self.batch, self.enc, self.decoding.results)


K = TypeVar("K")
Outcome = tuple[K, dict | Exception]


class StepwiseSession(Generic[K]):
    """`Predictor.predict` a step at a time, for a server (continuous batching): requests join between
    decoding steps (`add`) and each one's result comes out of the `step` its decoding ends, so a
    short request does not wait for a long one. Every request gets the tokens it gets alone
    (`StepwiseBatch`); sampling requests decode as their own group, so a seed draws as it would alone.
    Requests with equal settings that arrive together share a group, as in `predict`. Image-code
    outputs cannot join the step-wise batch: `add` runs them to their end (a whole batch between
    steps). Keys are the caller's handles of its requests; outcomes pair them with a result or the
    exception that request raised."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.batch = StepwiseBatch(predictor.model)
        self.groups: dict[Decoding, tuple[_Group, list[K]]] = {}

    def __len__(self) -> int:
        """Requests decoding now."""
        return sum(len(keys) for _, keys in self.groups.values())

    @torch.inference_mode()
    def add(self, requests: Sequence[tuple[K, Request]]) -> list[Outcome]:
        """Start `requests` (their encoder pass and first decoder call); returns the outcomes known
        already: requests that failed (alone: a failing group is retried request by request) and
        image-code outputs."""
        done: list[Outcome] = []
        groups: dict[tuple, list[tuple[K, _Prepared]]] = {}
        for key, request in requests:
            try:
                p = self.predictor._prepare(request)
            except Exception as e:
                done.append((key, e))
                continue
            alone = p.config.do_sample
            groups.setdefault((id(p),) if alone else (repr(p.config), p.code_output), []).append((key, p))
        for members in groups.values():
            done += self._start(members)
        return done

    def _start(self, members: list[tuple[K, _Prepared]]) -> list[Outcome]:
        keys, batch = [k for k, _ in members], [p for _, p in members]
        try:
            if batch[0].code_output:
                return list(zip(keys, self.predictor._run(batch), strict=True))
            group = _Group(self.predictor, batch)
            self.batch.join([group.decoding])
        except Exception as e:
            if len(members) == 1:
                return [(keys[0], e)]
            return [outcome for member in members for outcome in self._start([member])]
        self.groups[group.decoding] = (group, keys)
        return []

    @torch.inference_mode()
    def step(self) -> list[Outcome]:
        """One decoding step of every request: listeners get their tokens, cancelled requests leave;
        returns the outcomes of the requests whose decoding ended. An error in the shared step fails
        every request in it (the session is empty afterwards)."""
        try:
            for decoding, step in self.batch.choose():
                self.groups[decoding][0].follow(step)
            finished = self.batch.advance()
        except Exception as e:
            keys = [k for _, ks in self.groups.values() for k in ks]
            self.batch, self.groups = StepwiseBatch(self.predictor.model), {}
            return [(k, e) for k in keys]
        done: list[Outcome] = []
        for decoding in finished:
            group, keys = self.groups.pop(decoding)
            try:
                done += zip(keys, group.results(), strict=True)
            except Exception as e:
                done += [(k, e) for k in keys]
        return done
