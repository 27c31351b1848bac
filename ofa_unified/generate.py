"""Decoding for the encoder-decoder: greedy, sampling and beam search over the decoder's KV cache,
constrained decoding (candidate tries, token-id ranges) and OFA's "allcand" candidate scoring.

Every search runs on rows (one per sample, or per beam/sample draw) that share one batched
`model.decode` call per step. Samples that finish leave the batch (`enc.index_select` plus
`cache.reorder` with a shorter index, as fairseq shrinks its batch), so a long sample does not make
the others pay for padding.

Scores. Every `Hypothesis.score` is `sum(token_logprobs) / len ** length_penalty`, where `len` counts
the final eos (fairseq's normalisation), in all three modes, so greedy equals beam search with one
beam token for token and score; `length_penalty=0` gives the plain sum (`Hypothesis.logprob`). The
log-probs are the model's (temperature 1, before top-k/top-p), so a score means the same thing
whichever way the tokens were chosen.

Step by step. `Decoding` runs one search as an iterator of `Step`s, one per decoder call, so a caller
can hand greedy or sampled tokens on as they are chosen (the server streams them) and drop samples
whose reader went away (`Decoding.cancel`); `generate` is that iterator run to its end. Beam search
yields steps without tokens: a beam's best hypothesis is known only when the search ends.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import marisa_trie
import torch
import torch.nn.functional as F

from ofa_unified.model import EncoderOutput, KVCache

# Same ids as ofa_unified.vocab (OFA's order); the decoder input always starts with bos.
BOS, PAD, EOS = 0, 1, 2
# Sampling clamps the temperature to this range: far outside it lprobs / T overflows float32 (NaN
# probabilities, a crash in multinomial), and at its ends the distribution is already as good as
# one-hot (greedy) or uniform.
TEMPERATURE_RANGE = (1e-6, 1e6)


@dataclass
class GenerationConfig:
    """Decoding settings. `max_new_tokens` counts tokens before the eos (fairseq's max_len): at that
    point eos is forced. `beam_size > 1` with `do_sample` draws that many independent samples."""

    max_new_tokens: int = 32
    min_new_tokens: int = 0
    beam_size: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def __post_init__(self) -> None:
        rules = [
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("min_new_tokens", 0 <= self.min_new_tokens <= self.max_new_tokens, "in [0, max_new_tokens]"),
            ("beam_size", self.beam_size >= 1, ">= 1"),
            ("temperature", math.isfinite(self.temperature) and self.temperature > 0, "a finite number > 0"),
            ("top_k", self.top_k >= 0, ">= 0 (0 = off)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("length_penalty", math.isfinite(self.length_penalty), "finite"),
            ("no_repeat_ngram_size", self.no_repeat_ngram_size >= 0, ">= 0 (0 = off)"),
        ]
        for name, ok, rule in rules:
            if not ok:
                raise ValueError(f"GenerationConfig.{name} must be {rule}, got {getattr(self, name)!r}")


@dataclass
class Hypothesis:
    """One output. `tokens` has no bos, no forced prefix and no final eos; `token_logprobs` has one
    entry per token of `tokens` followed by the eos's."""

    tokens: list[int]
    score: float
    token_logprobs: list[float] = field(default_factory=list)

    @property
    def logprob(self) -> float:
        """Sum of log-probs, eos included (the score without length normalisation)."""
        return math.fsum(self.token_logprobs)


@runtime_checkable
class Constraint(Protocol):
    """Restricts the next token of one sample. `generated` holds the tokens chosen so far (no bos,
    no prefix). Return the allowed ids (an empty sequence ends the hypothesis with eos) or None for
    any id. A constraint may also define `max_tokens`: the most tokens before eos it can require;
    decoding then runs that long even past `max_new_tokens`, so a constrained path can always finish."""

    def allowed(self, generated: Sequence[int]) -> Sequence[int] | None: ...


class TrieConstraint:
    """Only continuations of the candidate token sequences; every finished hypothesis is exactly one
    candidate. eos is appended to each, so `[a]` and `[a, b]` are different, complete paths."""

    def __init__(self, candidates: Sequence[Sequence[int]], eos_id: int = EOS):
        if len(candidates) == 0:
            raise ValueError("TrieConstraint needs at least one candidate")
        for i, cand in enumerate(candidates):
            if len(cand) == 0:
                raise ValueError(f"TrieConstraint candidate {i} is empty")
            if any(t < 0 or t == eos_id for t in cand):
                raise ValueError(f"TrieConstraint candidate {i} has a negative or eos id: {list(cand)}")
        self.eos_id = eos_id
        self.max_tokens = max(len(c) for c in candidates)
        self._trie = marisa_trie.Trie(self._key([*c, eos_id]) for c in candidates)
        self._children: dict[str, list[int]] = {}

    @staticmethod
    def _key(ids: Sequence[int]) -> str:
        # Every id ends with a space, so the prefix "1 2 " cannot match the key "1 23 ".
        return "".join(f"{t} " for t in ids)

    def allowed(self, generated: Sequence[int]) -> list[int]:
        key = self._key(generated)
        children = self._children.get(key)
        if children is None:
            n = len(key)
            children = sorted({int(k[n:].split(" ", 1)[0]) for k in self._trie.keys(key) if len(k) > n})
            self._children[key] = children
        return children

    def __contains__(self, tokens: Sequence[int]) -> bool:
        """Whether `tokens` (without eos) is one of the candidates."""
        return self._key([*tokens, self.eos_id]) in self._trie

    def __len__(self) -> int:
        return len(self._trie)


def split_at(ids: Sequence[int], separator: Sequence[int]) -> tuple[list[int], list[int]] | None:
    """(before, after) `ids` at the separator's first occurrence; None where it does not occur."""
    ids, sep, n = list(ids), list(separator), len(separator)
    for i in range(len(ids) - n + 1):
        if ids[i : i + n] == sep:
            return ids[:i], ids[i + n :]
    return None


class EvidenceConstraint:
    """Free text, then `separator`, then one of the trie's candidates: a verdict written after the
    evidence that settles it ("small circles: blue answer: no"). A text without the separator may end
    only where it is itself a candidate (an answer that needs no evidence, "red"); evidence that
    reaches `max_evidence` tokens is closed by the separator, so every finished hypothesis holds a
    candidate. `text_ids`: the ids evidence may use (subwords; eos, bos and pad excluded)."""

    def __init__(
        self, trie: TrieConstraint, separator: Sequence[int], text_ids: range, max_evidence: int = 64
    ):
        if not separator:
            raise ValueError("EvidenceConstraint needs a non-empty separator")
        if text_ids.start <= trie.eos_id < text_ids.stop:
            raise ValueError(f"text_ids {text_ids} must not contain eos ({trie.eos_id})")
        self.trie = trie
        self.separator = list(separator)
        self.max_evidence = max_evidence
        self.max_tokens = max_evidence + len(self.separator) + trie.max_tokens
        self._text = text_ids
        eos = trie.eos_id
        self._text_or_eos = range(eos, text_ids.stop) if text_ids.start == eos + 1 else [eos, *text_ids]

    def allowed(self, generated: Sequence[int]) -> Sequence[int]:
        parts = split_at(generated, self.separator)
        if parts is not None:
            return self.trie.allowed(parts[1])
        if len(generated) >= self.max_evidence:  # close the evidence: the separator's next token
            sep = self.separator
            written = max(k for k in range(len(sep)) if k == 0 or list(generated[-k:]) == sep[:k])
            return [sep[written]]
        return self._text_or_eos if generated and generated in self.trie else self._text


class TokenRangeConstraint:
    """Only ids in [lo, hi) (bins for boxes, codes for images). With `exact_len`, exactly that many
    such tokens and then eos; without it eos is allowed at any step."""

    def __init__(self, lo: int, hi: int, exact_len: int | None = None, eos_id: int = EOS):
        if not 0 <= lo < hi:
            raise ValueError(f"TokenRangeConstraint needs 0 <= lo < hi, got lo={lo}, hi={hi}")
        if exact_len is not None and exact_len < 1:
            raise ValueError(f"TokenRangeConstraint exact_len must be >= 1, got {exact_len}")
        if lo <= eos_id < hi:
            raise ValueError(f"TokenRangeConstraint range [{lo}, {hi}) must not contain eos ({eos_id})")
        self.exact_len = exact_len
        self.max_tokens = exact_len
        self._range = range(lo, hi)
        self._eos = (eos_id,)
        self._range_or_eos = (*self._range, eos_id)

    def allowed(self, generated: Sequence[int]) -> Sequence[int]:
        if self.exact_len is None:
            return self._range_or_eos
        return self._range if len(generated) < self.exact_len else self._eos


ConstraintArg = Constraint | Sequence[Constraint | None] | None


class _Rows:
    """The rows being decoded: fed tokens, cache, encoder output, and per-row masking rules."""

    def __init__(
        self, model, enc, config: GenerationConfig, constraints: ConstraintArg, prefix, per_sample: int
    ) -> None:
        batch, device = enc.hidden.size(0), enc.hidden.device
        self.model, self.config, self.device = model, config, device
        self.constraints = _per_sample(constraints, batch)
        prefix = _check_prefix(prefix, batch)
        lengths = [len(p) for p in prefix]
        self.prefix_len = torch.tensor(lengths, device=device)
        self.prefix = torch.full((batch, max(lengths, default=0) + 1), PAD, dtype=torch.long, device=device)
        for b, p in enumerate(prefix):
            if p:
                self.prefix[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        caps = [max(config.max_new_tokens, getattr(c, "max_tokens", None) or 0) for c in self.constraints]
        self.cap = torch.tensor(caps, device=device)
        self.has_constraint = torch.tensor([c is not None for c in self.constraints], device=device)
        self.sample = torch.arange(batch, device=device).repeat_interleave(per_sample)
        self.enc = enc.repeat_interleave(per_sample) if per_sample > 1 else enc
        # The prefix length all samples share is fed in the first call; ragged rest is forced step by step.
        common = min(lengths, default=0)
        bos = torch.full((len(self.sample), 1), BOS, dtype=torch.long, device=device)
        self.tokens = torch.cat([bos, self.prefix[self.sample, :common]], dim=1)
        logits, self.cache = model.decode(self.tokens, self.enc, None)
        self.logits = logits[:, -1]

    def generated_len(self) -> torch.Tensor:
        """Tokens generated so far per row, excluding the prefix (negative while it is being forced)."""
        return self.tokens.size(1) - 1 - self.prefix_len[self.sample]

    def generated(self, row: int) -> list[int]:
        return self.tokens[row, 1 + int(self.prefix_len[self.sample[row]]) :].tolist()

    def logprobs(self) -> torch.Tensor:
        """Next-token log-probs with every rule applied. Follows OFA: log_softmax over the full vocab
        first, then disallowed ids are set to -inf without renormalising, so a constrained score is
        the model's own log-likelihood (and equals `score_candidates`). Forced prefix tokens get 0.
        Only rows with a constraint or a blocked n-gram build masks over the vocabulary; the others
        (any id but bos/pad, eos banned below min_new_tokens, forced at max_new_tokens) set a few
        entries."""
        cfg = self.config
        lprobs = F.log_softmax(self.logits.float(), dim=-1)
        steps = self.generated_len()
        ban_rows, ban_ids = self._ngram_bans(steps)
        masked = self.has_constraint[self.sample] & (steps >= 0)
        masked[ban_rows] = True
        sub = masked.nonzero().squeeze(1)
        exact = self._masked_rows(lprobs, steps, sub, ban_rows, ban_ids) if len(sub) else None
        lprobs[:, [BOS, PAD]] = -math.inf  # never generated (fairseq bans pad)
        lprobs[(steps >= 0) & (steps < cfg.min_new_tokens), EOS] = -math.inf
        over = (steps >= cfg.max_new_tokens).nonzero().squeeze(1)
        if len(over):
            eos = lprobs[over, EOS]
            lprobs[over] = -math.inf
            lprobs[over, EOS] = eos
        if exact is not None:
            lprobs[sub] = exact
        forcing = (steps < 0).nonzero().squeeze(1)
        if len(forcing):
            forced = self.prefix[self.sample[forcing], self.tokens.size(1) - 1]
            lprobs[forcing] = -math.inf
            lprobs[forcing, forced] = 0.0
        return lprobs

    def _masked_rows(
        self,
        lprobs: torch.Tensor,
        steps: torch.Tensor,
        rows: torch.Tensor,
        ban_rows: torch.Tensor,
        ban_ids: torch.Tensor,
    ) -> torch.Tensor:
        """The log-probs of `rows` (generating, each with a constraint or a blocked n-gram) with
        their allowed-id masks applied; min_new_tokens and n-gram blocking give way where they would
        leave nothing allowed."""
        allowed = self._allowed(steps, rows, lprobs.size(1))
        banned = torch.zeros_like(allowed)
        too_short = steps[rows] < self.config.min_new_tokens
        banned[too_short, EOS] = True
        local = torch.full_like(steps, -1)
        local[rows] = torch.arange(len(rows), device=self.device)
        banned[local[ban_rows], ban_ids] = True
        soft = allowed & ~banned
        allowed = torch.where(soft.any(dim=1, keepdim=True), soft, allowed)
        return lprobs[rows].masked_fill(~allowed, -math.inf)

    def _allowed(self, steps: torch.Tensor, rows: torch.Tensor, vocab: int) -> torch.Tensor:
        """[len(rows), vocab] ids allowed by each row's constraint (`rows` are generating)."""
        allowed = torch.ones(len(rows), vocab, dtype=torch.bool, device=self.device)
        allowed[:, [BOS, PAD]] = False  # never generated (fairseq bans pad); a constraint may allow them
        constrained = self.has_constraint[self.sample[rows]].tolist()
        if any(constrained):
            tokens = self.tokens[rows].tolist()
            starts = (1 + self.prefix_len[self.sample[rows]]).tolist()
            samples = self.sample[rows].tolist()
            groups: dict[int, tuple[Sequence[int], list[int]]] = {}  # rows sharing one allowed object
            for i in range(len(rows)):
                if not constrained[i]:
                    continue
                ids = self.constraints[samples[i]].allowed(tokens[i][starts[i] :])
                if ids is not None:
                    groups.setdefault(id(ids), (ids, []))[1].append(i)
            for ids, group in groups.values():
                idx = torch.tensor(group, device=self.device)
                allowed[idx] = False
                if isinstance(ids, range) and ids.step == 1:
                    allowed[idx, ids.start : ids.stop] = True
                elif len(ids) == 0:
                    allowed[idx, EOS] = True
                else:
                    allowed[idx[:, None], torch.tensor(list(ids), device=self.device)[None, :]] = True
        # At max_new_tokens eos is forced where the constraint allows it; at the constraint's own
        # limit (its longest path) it is forced regardless.
        row_steps = steps[rows]
        over = row_steps >= self.config.max_new_tokens
        force = over & (allowed[:, EOS] | (row_steps >= self.cap[self.sample[rows]]))
        allowed[force] = False
        allowed[force, EOS] = True
        return allowed

    def _ngram_bans(self, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, id) pairs that `no_repeat_ngram_size` blocks. An n-gram is blocked when its first n-1
        tokens equal the last n-1 generated ones; only generated tokens count (the prompt prefix is
        not output, so repeating it is fine)."""
        n = self.config.no_repeat_ngram_size
        if n == 0 or not bool((steps >= n).any()):
            empty = torch.zeros(0, dtype=torch.long, device=self.device)
            return empty, empty
        length = self.tokens.size(1)
        windows = self.tokens.unfold(1, n, 1)  # [N, W, n]
        start = torch.arange(windows.size(1), device=self.device)
        first = 1 + self.prefix_len[self.sample]  # position of the first generated token
        inside = (start[None, :] >= first[:, None]) & (steps >= n - 1)[:, None]
        suffix = self.tokens[:, length - (n - 1) :]
        match = (windows[:, :, :-1] == suffix[:, None, :]).all(dim=-1) & inside
        rows, cols = match.nonzero(as_tuple=True)
        return rows, windows[rows, cols, -1]

    def select(self, src: torch.Tensor, next_tokens: torch.Tensor) -> None:
        """Keep rows `src` (in that order; beams reorder, finished samples drop out) and append one
        token to each; `decode` then runs the decoder. Rows handed to a `StepwiseBatch` (no `cache`
        of their own) leave the encoder output and cache to it."""
        if not _is_identity(src, len(self.sample)):
            new_sample = self.sample[src]
            if self.cache is not None:
                if not torch.equal(new_sample, self.sample):  # rows of a sample share their encoder output
                    self.enc = self.enc.index_select(src)
                self.cache = self.cache.reorder(src)
            self.sample = new_sample
            self.tokens = self.tokens[src]
        self.tokens = torch.cat([self.tokens, next_tokens[:, None]], dim=1)

    def decode(self) -> None:
        """Run the decoder one step on the tokens `select` appended."""
        logits, self.cache = self.model.decode(self.tokens[:, -1:], self.enc, self.cache)
        self.logits = logits[:, -1]

    def hypothesis(self, row: int, logprobs: torch.Tensor, eos_logprob: float) -> Hypothesis:
        """Finish `row` with eos; `logprobs` are its scored log-probs aligned with `tokens[row, 1:]`."""
        tokens = self.generated(row)
        lps = [*logprobs[len(logprobs) - len(tokens) :].tolist(), eos_logprob]
        score = math.fsum(lps) / len(lps) ** self.config.length_penalty
        return Hypothesis(tokens, score, lps)


def _is_identity(src: torch.Tensor, n: int) -> bool:
    """Whether keeping rows `src` of `n` keeps them all, in order."""
    return len(src) == n and torch.equal(src, torch.arange(n, device=src.device))


def _per_sample(constraints: ConstraintArg, batch: int) -> list[Constraint | None]:
    if constraints is None or isinstance(constraints, Constraint):
        return [constraints] * batch
    constraints = list(constraints)
    if len(constraints) != batch:
        raise ValueError(f"got {len(constraints)} constraints for a batch of {batch}")
    return constraints


def _check_prefix(prefix: Sequence[Sequence[int]] | None, batch: int) -> list[list[int]]:
    if prefix is None:
        return [[] for _ in range(batch)]
    if len(prefix) != batch:
        raise ValueError(f"got {len(prefix)} prefixes for a batch of {batch}")
    prefix = [list(p) for p in prefix]
    if any(EOS in p for p in prefix):
        raise ValueError("a decoder prefix must not contain eos (OFA's prompt is the source minus its eos)")
    return prefix


@dataclass
class Step:
    """What one decoding step chose. Slots number the outputs: `sample * per_sample + draw` (the
    sample itself for greedy). `slots`/`tokens`: the token each slot appended, eos and forced prefix
    tokens left out; `ended`: the slots that wrote eos. Beam search's steps carry neither."""

    slots: torch.Tensor
    tokens: torch.Tensor
    ended: list[int]

    def pairs(self) -> list[tuple[int, int]]:
        """(slot, token) for each token appended this step."""
        return list(zip(self.slots.tolist(), self.tokens.tolist(), strict=True))


_NO_STEP_TOKENS = torch.zeros(0, dtype=torch.long)


class Decoding:
    """One search (as `generate` would run it) as an iterator of `Step`s; `results` is set, as
    `generate` returns it, once the iterator is exhausted. Iterate once."""

    def __init__(
        self,
        model,
        enc,
        config: GenerationConfig | None = None,
        constraints: ConstraintArg = None,
        prefix: Sequence[Sequence[int]] | None = None,
    ) -> None:
        self.config = config = config or GenerationConfig()
        self.beam = not config.do_sample and config.beam_size > 1
        self.per_sample = config.beam_size if config.do_sample else 1
        self.results: list[list[Hypothesis]] | None = None
        self._cancelled: set[int] = set()
        self._inputs = (model, enc, constraints, prefix)
        self._steps = self._collect(_steps(self._search, self._cancelled))

    def _search(self) -> _Search:
        """The search over its rows, after the decoder's first call (run lazily, by the first step)."""
        model, enc, constraints, prefix = self._inputs
        rows = _Rows(model, enc, self.config, constraints, prefix, self.config.beam_size)
        return _BeamSearch(rows, self.config) if self.beam else _SampleSearch(rows, self.config)

    @property
    def streams(self) -> bool:
        """Whether each step's tokens are the final answer's: greedy, or one sample per sample."""
        return not self.beam and self.per_sample == 1

    def _collect(self, steps: Generator[Step, None, list[list[Hypothesis]]]) -> Iterator[Step]:
        self.results = yield from steps

    def __iter__(self) -> Iterator[Step]:
        return self._steps

    def cancel(self, samples: Collection[int]) -> None:
        """Stop decoding these samples (their reader is gone) from the next step on; their results
        are empty lists. The other samples decode as before, except that with sampling their later
        draws change (the batch shares one random generator)."""
        self._cancelled.update(samples)

    def run(self) -> list[list[Hypothesis]]:
        """Decode to the end (what steps are left) and return the results."""
        for _ in self._steps:
            pass
        assert self.results is not None
        return self.results


def generate(
    model,
    enc,
    config: GenerationConfig | None = None,
    constraints: ConstraintArg = None,
    prefix: Sequence[Sequence[int]] | None = None,
) -> list[list[Hypothesis]]:
    """Decode every sample of `enc` (the model's EncoderOutput). Greedy when `beam_size == 1` and not
    `do_sample`; beam search when `beam_size > 1`; sampling when `do_sample`. `constraints`: one for
    all samples or one (or None) per sample. `prefix`: per-sample tokens forced after bos (OFA's
    prev_output prompt), ragged allowed, neither scored nor returned. Returns per sample the
    hypotheses best first: `beam_size` of them (fewer if a constraint allows fewer), one for greedy.
    `Decoding` runs the same search step by step."""
    return Decoding(model, enc, config, constraints, prefix).run()


class StepwiseBatch:
    """Decodings run together, one decoder call per step over all their rows (continuous batching,
    the encoder-decoder case of TGI's batch filter/concatenate): a `Decoding` joins between steps
    (`join`) and leaves the step it finishes, so a short one does not wait for a long one. Each step
    is `choose` (every decoding's `Step`; a caller may `Decoding.cancel` samples then) and `advance`.

    Every decoding gets the tokens it gets alone: its search, masks and sampling generator are its
    own (a seeded sampling decoding draws as it would alone); only the decoder call is shared. A
    joining decoding's rows start at position 0 next to rows at step t: its first call runs on its own
    rows and cache, which then join the batch's (`KVCache.concat`: encoder sides padded and masked,
    each row's own length, masked keys past it). Image-code outputs cannot join (their positions are
    not per row); run them alone."""

    def __init__(self, model) -> None:
        self.model = model
        self.members: list[tuple[Decoding, _Search]] = []
        self.enc: EncoderOutput | None = None
        self.cache: KVCache | None = None
        # Per row: rows with equal ids share their encoder row (the same sample of one decoding).
        self.sample_ids = torch.zeros(0, dtype=torch.long)
        self._next_id = 0

    def __len__(self) -> int:
        return len(self.members)

    @property
    def rows(self) -> int:
        return len(self.sample_ids)

    @torch.no_grad()
    def join(self, decodings: Sequence[Decoding]) -> None:
        """Start `decodings` (each its decoder's first call, on its own rows) and add their rows."""
        if not decodings:
            return
        encs, caches, ids = [], [], []
        if self.cache is not None:
            encs, caches, ids = [self.enc], [self.cache], [self.sample_ids]
        for decoding in decodings:
            enc = decoding._inputs[1]
            if enc.code_mask is not None and bool(enc.code_mask.any()):
                raise ValueError("image-code outputs cannot join a StepwiseBatch: decode them alone")
            search = decoding._search()
            rows = search.rows
            encs.append(rows.enc)
            caches.append(rows.cache)
            ids.append(rows.sample + self._next_id)
            self._next_id += len(decoding._inputs[1].hidden)
            rows.enc = rows.cache = None  # the batch's from now on
            self.members.append((decoding, search))
        self.sample_ids = torch.cat(ids)
        self.enc = encs[0] if len(encs) == 1 else EncoderOutput.concat(encs)
        self.cache = caches[0] if len(caches) == 1 else KVCache.concat(caches, self.enc)

    def choose(self) -> list[tuple[Decoding, Step]]:
        """Every decoding's step from its rows' current logits."""
        return [(decoding, search.choose()) for decoding, search in self.members]

    @torch.no_grad()
    def advance(self) -> list[Decoding]:
        """After `choose`: the decodings that finished (or were cancelled whole) leave, their
        `results` set and returned; the others' rows run one decoder step together."""
        kept: list[tuple[Decoding, _Search]] = []
        sources, finished, offset = [], [], 0
        for decoding, search in self.members:
            n = len(search.rows.sample)
            src = search.advance(decoding._cancelled)
            if len(src):
                kept.append((decoding, search))
                sources.append(src + offset)
            else:
                decoding.results = search.results(decoding._cancelled)
                finished.append(decoding)
            offset += n
        self.members = kept
        if not kept:
            self.enc, self.cache, self.sample_ids = None, None, self.sample_ids[:0]
            return finished
        src = torch.cat(sources)
        assert self.enc is not None and self.cache is not None
        if not _is_identity(src, len(self.sample_ids)):
            ids = self.sample_ids[src]
            if not torch.equal(ids, self.sample_ids):  # rows of a sample share their encoder output
                self.enc = self.enc.index_select(src)
            self.cache = self.cache.reorder(src)
            self.sample_ids = ids
        tokens = torch.cat([search.rows.tokens[:, -1:] for _, search in kept])
        logits, self.cache = self.model.decode(tokens, self.enc, self.cache)
        start = 0
        for _, search in kept:
            n = len(search.rows.sample)
            search.rows.logits = logits[start : start + n, -1]
            start += n
        return finished


def _filter_top_k_top_p(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < scores.size(1):
        kth = scores.topk(top_k, dim=1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p < 1:
        sorted_scores, order = scores.sort(dim=1, descending=True)
        probs = sorted_scores.softmax(dim=1)
        drop = probs.cumsum(dim=1) - probs >= top_p  # keep the smallest set whose mass reaches top_p
        drop[:, 0] = False  # the best token stays, even for a top_p that rounds to 0 in float32
        scores = scores.masked_fill(drop.scatter(1, order, drop), -math.inf)
    return scores


class _Search(Protocol):
    """One search over its `_Rows`, a step at a time: `choose` picks this step's tokens from the
    rows' logits; `advance` (after the caller saw the step and maybe cancelled samples) keeps the
    rows that go on and appends their tokens, returning the kept rows (empty once the search is
    over); then the decoder runs on them (`_Rows.decode`, or a `StepwiseBatch` for several searches)."""

    rows: _Rows

    def choose(self) -> Step: ...

    def advance(self, cancelled: set[int]) -> torch.Tensor: ...

    def results(self, cancelled: set[int]) -> list[list[Hypothesis]]: ...


@torch.no_grad()
def _steps(
    start: Callable[[], _Search], cancelled: set[int]
) -> Generator[Step, None, list[list[Hypothesis]]]:
    """A search run alone: its steps, then its results."""
    search = start()
    while True:
        yield search.choose()
        if len(search.advance(cancelled)) == 0:
            return search.results(cancelled)
        search.rows.decode()


class _SampleSearch:
    """Greedy (argmax) or sampling, `beam_size` independent draws per sample with `do_sample`. The
    draws come from one generator seeded with `config.seed` (the global one without a seed)."""

    def __init__(self, rows: _Rows, config: GenerationConfig) -> None:
        self.rows, self.config = rows, config
        self.per_sample = config.beam_size if config.do_sample else 1
        self.generator = None
        if config.do_sample and config.seed is not None:
            self.generator = torch.Generator(device=rows.device).manual_seed(config.seed)
        self.temperature = min(max(config.temperature, TEMPERATURE_RANGE[0]), TEMPERATURE_RANGE[1])
        self.origin = torch.arange(len(rows.sample), device=rows.device)  # output slot of each live row
        self.history = torch.zeros(len(self.origin), rows.tokens.size(1) - 1, device=rows.device)
        self.out: list[Hypothesis | None] = [None] * len(self.origin)

    def choose(self) -> Step:
        config, rows = self.config, self.rows
        lprobs = rows.logprobs()
        if config.do_sample:
            # lprobs differ from logits by a per-row constant, so lprobs / T is softmax(logits / T).
            scores = _filter_top_k_top_p(lprobs / self.temperature, config.top_k, config.top_p)
            tokens = torch.multinomial(scores.softmax(dim=1), 1, generator=self.generator).squeeze(1)
        else:
            tokens = lprobs.argmax(dim=1)
        picked = lprobs.gather(1, tokens[:, None]).squeeze(1)
        done = tokens == EOS
        ended = done.nonzero().squeeze(1).tolist()
        for r in ended:
            self.out[int(self.origin[r])] = rows.hypothesis(r, self.history[r], float(picked[r]))
        self._chosen = tokens, picked, done
        written = ~done & (rows.generated_len() >= 0)  # not eos, not a forced prefix token
        return Step(self.origin[written], tokens[written], self.origin[ended].tolist())

    def advance(self, cancelled: set[int]) -> torch.Tensor:
        tokens, picked, done = self._chosen
        live = ~done
        if cancelled:
            gone = torch.tensor(sorted(cancelled), device=self.rows.device)
            live &= ~torch.isin(self.rows.sample, gone)
        keep = live.nonzero().squeeze(1)
        if len(keep):
            self.history = torch.cat([self.history[keep], picked[keep, None]], dim=1)
            self.origin = self.origin[keep]
            self.rows.select(keep, tokens[keep])
        return keep

    def results(self, cancelled: set[int]) -> list[list[Hypothesis]]:
        # Every row ends with eos unless its sample was cancelled (its result is then empty).
        k, out = self.per_sample, self.out
        return [
            [] if b in cancelled else sorted(out[b * k : (b + 1) * k], key=lambda h: -h.score)  # type: ignore[union-attr]
            for b in range(len(out) // k)
        ]


def _beam_search(model, enc, config, constraints, prefix) -> list[list[Hypothesis]]:
    """Beam search to its end (what `generate` runs for `beam_size > 1`, whatever `do_sample`)."""
    rows = lambda: _BeamSearch(_Rows(model, enc, config, constraints, prefix, config.beam_size), config)
    steps = _steps(rows, set())
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


class _BeamSearch:
    """Beam search over B*K rows. Like fairseq/HF: each step takes the top 2K (beam, token) pairs of
    a sample; eos pairs ranked within the top K finish a hypothesis, the best K others stay live. A
    sample stops once it has K finished hypotheses and its best live beam, scored as if it ended
    now, cannot beat the worst of them (HF's default), or when no live beam is left."""

    def __init__(self, rows: _Rows, config: GenerationConfig) -> None:
        self.rows, self.config = rows, config
        k, device = config.beam_size, rows.device
        batch = len(rows.sample) // k
        self.samples = torch.arange(batch, device=device)  # live samples, in row order
        # Only beam 0 starts live: the K rows are identical copies until the first choice.
        self.beam_scores = torch.full((batch, k), -math.inf, device=device)
        self.beam_scores[:, 0] = 0.0
        self.history = torch.zeros(batch * k, rows.tokens.size(1) - 1, device=device)
        self.best_finished = torch.full((batch, k), -math.inf, device=device)  # top-K finished scores
        self.finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
        self.rank = torch.arange(2 * k, device=device)

    def choose(self) -> Step:
        k, lp, rows, device = self.config.beam_size, self.config.length_penalty, self.rows, self.rows.device
        lprobs = rows.logprobs()
        live, vocab = len(self.samples), lprobs.size(1)
        length = (rows.generated_len().view(live, k)[:, 0] + 1).clamp(min=1).float()  # incl. this token
        cand = (self.beam_scores.view(-1, 1) + lprobs).view(live, k * vocab)
        top_scores, top_idx = cand.topk(2 * k, dim=1)
        src = top_idx // vocab + (torch.arange(live, device=device) * k)[:, None]  # row of each pair
        tokens = top_idx % vocab
        token_lp = lprobs[src, tokens]
        is_eos = tokens == EOS

        ends = is_eos & (self.rank < k) & torch.isfinite(top_scores)
        end_scores = torch.where(ends, top_scores / length[:, None] ** lp, -math.inf)
        self.best_finished = torch.cat([self.best_finished, end_scores], dim=1).topk(k, dim=1).values
        for i, j in ends.nonzero().tolist():
            r = int(src[i, j])
            self.finished[int(self.samples[i])].append(
                rows.hypothesis(r, self.history[r], float(token_lp[i, j]))
            )

        # The best K non-eos pairs stay live (there are always K: each beam has one eos pair).
        order = (is_eos.long() * 2 * k + self.rank).argsort(dim=1)[:, :k]
        self.beam_scores = top_scores.gather(1, order)
        best_live = self.beam_scores[:, 0] / length**lp
        worst = self.best_finished[:, -1]  # -inf until K hypotheses have finished
        done = ~torch.isfinite(best_live) | (torch.isfinite(worst) & (best_live <= worst))
        self._chosen = src, tokens, token_lp, order, done
        return Step(_NO_STEP_TOKENS, _NO_STEP_TOKENS, [])

    def advance(self, cancelled: set[int]) -> torch.Tensor:
        src, tokens, token_lp, order, done = self._chosen
        if cancelled:
            done = done | torch.isin(self.samples, torch.tensor(sorted(cancelled), device=self.rows.device))
        keep = (~done).nonzero().squeeze(1)
        if len(keep) == 0:
            return keep
        keep_rows = src.gather(1, order)[keep].flatten()
        next_tokens = tokens.gather(1, order)[keep].flatten()
        picked = token_lp.gather(1, order)[keep].flatten()
        self.history = torch.cat([self.history[keep_rows], picked[:, None]], dim=1)
        self.beam_scores, self.samples = self.beam_scores[keep], self.samples[keep]
        self.best_finished = self.best_finished[keep]
        self.rows.select(keep_rows, next_tokens)
        return keep_rows

    def results(self, cancelled: set[int]) -> list[list[Hypothesis]]:
        k = self.config.beam_size
        return [
            [] if b in cancelled else sorted(hyps, key=lambda h: -h.score)[:k]
            for b, hyps in enumerate(self.finished)
        ]


@torch.no_grad()
def score_candidates(
    model,
    enc,
    candidates: Sequence[Sequence[Sequence[int]]],
    chunk_size: int = 64,
    prefix: Sequence[Sequence[int]] | None = None,
) -> list[list[float]]:
    """OFA's "allcand": the summed log-prob of every candidate (eos appended) of every sample,
    teacher-forced over that sample's one encoder output. An exact argmax over a closed answer set,
    where a beam over a trie is an approximation. (sample, candidate) pairs of all samples are packed
    into decoder batches of `chunk_size`; right padding is safe because the decoder is causal.
    `prefix` is forced after bos as in `generate` and not scored."""
    batch = enc.hidden.size(0)
    if len(candidates) != batch:
        raise ValueError(f"got candidates for {len(candidates)} samples, the batch has {batch}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    prefix = _check_prefix(prefix, batch)
    pairs = [(b, j) for b in range(batch) for j in range(len(candidates[b]))]
    scores = [[0.0] * len(c) for c in candidates]
    for start in range(0, len(pairs), chunk_size):
        chunk = pairs[start : start + chunk_size]
        seqs = [[BOS, *prefix[b], *candidates[b][j], EOS] for b, j in chunk]
        ids = torch.full((len(seqs), max(map(len, seqs))), PAD, dtype=torch.long)
        scored = torch.zeros(len(seqs), ids.size(1) - 1, dtype=torch.bool)  # targets that count
        for i, ((b, _), seq) in enumerate(zip(chunk, seqs, strict=True)):
            ids[i, : len(seq)] = torch.tensor(seq)
            scored[i, len(prefix[b]) : len(seq) - 1] = True
        ids, scored = ids.to(enc.hidden.device), scored.to(enc.hidden.device)
        rows = torch.tensor([b for b, _ in chunk], device=enc.hidden.device)
        logits, _ = model.decode(ids[:, :-1], enc.index_select(rows), None)
        lprobs = F.log_softmax(logits.float(), dim=-1).gather(2, ids[:, 1:, None]).squeeze(2)
        sums = lprobs.double().masked_fill(~scored, 0.0).sum(dim=1).tolist()
        for (b, j), s in zip(chunk, sums, strict=True):
            scores[b][j] = s
    return scores


def best_candidate(
    model,
    enc,
    candidates: Sequence[Sequence[Sequence[int]]],
    chunk_size: int = 64,
    prefix: Sequence[Sequence[int]] | None = None,
) -> list[tuple[int, float]]:
    """Per sample, the index and summed log-prob of the highest-scoring candidate (`score_candidates`)."""
    if any(len(c) == 0 for c in candidates):
        raise ValueError("every sample needs at least one candidate")
    scores = score_candidates(model, enc, candidates, chunk_size, prefix)
    return [max(enumerate(s), key=lambda js: js[1]) for s in scores]
