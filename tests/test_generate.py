"""Decoding tests against a tiny fake encoder-decoder that follows the model contract: a GRU decoder
whose cache is its hidden state, so a wrong cache reorder or batch shrink changes the log-probs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ofa_unified.generate import (
    BOS,
    EOS,
    PAD,
    Decoding,
    GenerationConfig,
    TokenRangeConstraint,
    TrieConstraint,
    _beam_search,
    _filter_top_k_top_p,
    best_candidate,
    generate,
    score_candidates,
)

VOCAB, HIDDEN = 12, 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: thread hand-offs on a shared CPU cost far more than the maths."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class FakeEncoderOutput:
    hidden: torch.Tensor  # [B, HIDDEN]

    def index_select(self, idx: torch.Tensor) -> FakeEncoderOutput:
        return FakeEncoderOutput(self.hidden.index_select(0, idx))

    def repeat_interleave(self, n: int) -> FakeEncoderOutput:
        return FakeEncoderOutput(self.hidden.repeat_interleave(n, dim=0))


@dataclass
class FakeCache:
    state: torch.Tensor  # [B, HIDDEN] GRU state after `length` tokens
    length: int

    def reorder(self, idx: torch.Tensor) -> FakeCache:
        self.state = self.state.index_select(0, idx)
        return self


class FakeModel(nn.Module):
    """Causal LM over VOCAB ids conditioned on a per-sample vector; `bias` is added to the logits."""

    def __init__(self, seed: int = 0, scale: float = 3.0, bias: dict[int, float] | None = None):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.embed = nn.Embedding(VOCAB, HIDDEN)
            self.cell = nn.GRUCell(HIDDEN, HIDDEN)
            self.out = nn.Linear(HIDDEN, VOCAB)
        self.scale = scale
        self.register_buffer("bias", torch.zeros(VOCAB))
        for token, value in (bias or {}).items():
            self.bias[token] = value
        self.config = SimpleNamespace(vocab_size=VOCAB)

    def encode(self, x: torch.Tensor) -> FakeEncoderOutput:
        return FakeEncoderOutput(torch.tanh(x))

    def decode(
        self, tokens: torch.Tensor, enc: FakeEncoderOutput, cache: FakeCache | None = None
    ) -> tuple[torch.Tensor, FakeCache]:
        assert tokens.size(0) == enc.hidden.size(0)
        if cache is None:
            assert (tokens[:, 0] == BOS).all()
            state, length = enc.hidden, 0
        else:
            assert cache.state.size(0) == tokens.size(0)
            state, length = cache.state, cache.length
        logits = []
        for t in range(tokens.size(1)):
            state = self.cell(self.embed(tokens[:, t]) + enc.hidden, state)
            logits.append(self.out(state) * self.scale + self.bias)
        return torch.stack(logits, dim=1), FakeCache(state, length + tokens.size(1))


def encoded(model: FakeModel, batch: int, seed: int = 1) -> FakeEncoderOutput:
    return model.encode(torch.randn(batch, HIDDEN, generator=torch.Generator().manual_seed(seed)))


@torch.no_grad()
def full_logprobs(model: FakeModel, enc: FakeEncoderOutput, b: int, seq: list[int]) -> torch.Tensor:
    """Log-probs of seq[1:] given seq[:-1], recomputed from scratch (no cache)."""
    logits, _ = model.decode(torch.tensor([seq[:-1]]), enc.index_select(torch.tensor([b])))
    return torch.log_softmax(logits[0].float(), dim=-1).gather(1, torch.tensor(seq[1:])[:, None]).squeeze(1)


@torch.no_grad()
def reference_greedy(model: FakeModel, enc: FakeEncoderOutput, b: int, prefix: list[int], max_new: int):
    """Greedy decoding recomputing the whole sequence every step."""
    seq = [BOS, *prefix]
    while True:
        logits, _ = model.decode(torch.tensor([seq]), enc.index_select(torch.tensor([b])))
        logits[0, -1, [BOS, PAD]] = -torch.inf
        token = EOS if len(seq) - 1 - len(prefix) >= max_new else int(logits[0, -1].argmax())
        if token == EOS:
            return seq[1 + len(prefix) :]
        seq.append(token)


def check_against_recomputation(model, enc, results, prefix, length_penalty):
    for b, hyps in enumerate(results):
        for h in hyps:
            assert BOS not in h.tokens and PAD not in h.tokens
            expected = full_logprobs(model, enc, b, [BOS, *prefix[b], *h.tokens, EOS])[len(prefix[b]) :]
            assert h.token_logprobs == pytest.approx(expected.tolist(), abs=1e-5)
            assert h.score == pytest.approx(sum(h.token_logprobs) / len(h.token_logprobs) ** length_penalty)


PREFIX = [[5, 6, 7], [], [4]]


def test_greedy_matches_full_recomputation_with_ragged_prefix():
    model = FakeModel(seed=3)
    enc = encoded(model, 3)
    results = generate(model, enc, GenerationConfig(max_new_tokens=6), prefix=PREFIX)
    assert [len(r) for r in results] == [1, 1, 1]
    for b in range(3):
        assert results[b][0].tokens == reference_greedy(model, enc, b, PREFIX[b], 6)
    check_against_recomputation(model, enc, results, PREFIX, 1.0)


def test_beam_cache_reorder_matches_full_recomputation_and_unbatched_runs():
    model = FakeModel(seed=4, scale=1.5)
    enc = encoded(model, 3)
    config = GenerationConfig(max_new_tokens=7, beam_size=4, length_penalty=0.7)
    results = generate(model, enc, config, prefix=PREFIX)
    check_against_recomputation(model, enc, results, PREFIX, 0.7)
    for b, hyps in enumerate(results):
        assert len(hyps) == 4
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == 4
        alone = generate(model, enc.index_select(torch.tensor([b])), config, prefix=[PREFIX[b]])[0]
        assert [h.tokens for h in alone] == [h.tokens for h in hyps]
        assert [h.score for h in alone] == pytest.approx([h.score for h in hyps], abs=1e-5)


def test_beam_size_one_equals_greedy_exactly():
    model = FakeModel(seed=5)
    enc = encoded(model, 3)
    constraints = [None, TrieConstraint([[4, 5], [6], [6, 7, 8]]), None]
    for lp in (0.0, 1.0, 2.0):
        config = GenerationConfig(max_new_tokens=5, length_penalty=lp, no_repeat_ngram_size=2)
        greedy = generate(model, enc, config, constraints, PREFIX)
        beam = _beam_search(model, enc, config, constraints, PREFIX)
        assert [[(h.tokens, h.score, h.token_logprobs) for h in r] for r in beam] == [
            [(h.tokens, h.score, h.token_logprobs) for h in r] for r in greedy
        ]


token_lists = st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=4)


@st.composite
def candidate_sets(draw) -> list[list[int]]:
    """Random candidates plus, when possible, a proper prefix of one of them and a duplicate."""
    cands = draw(st.lists(token_lists, min_size=1, max_size=5))
    longer = [c for c in cands if len(c) > 1]
    if longer:
        cands.append(longer[0][: draw(st.integers(1, len(longer[0]) - 1))])
    if draw(st.booleans()):
        cands.append(list(cands[0]))
    return cands


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    sets=st.lists(candidate_sets(), min_size=2, max_size=2),
    beam=st.integers(1, 4),
    max_new=st.integers(1, 5),
    seed=st.integers(0, 3),
    prefix=st.lists(token_lists, min_size=2, max_size=2),
)
def test_trie_constrained_beam_returns_only_candidates(sets, beam, max_new, seed, prefix):
    model = FakeModel(seed=seed)
    enc = encoded(model, 2, seed=seed)
    tries = [TrieConstraint(c) for c in sets]
    config = GenerationConfig(max_new_tokens=max_new, beam_size=beam, length_penalty=0.0, min_new_tokens=1)
    results = generate(model, enc, config, tries, prefix)
    scores = score_candidates(model, enc, sets, prefix=prefix)
    for cands, trie, hyps, cand_scores in zip(sets, tries, results, scores, strict=True):
        unique = {tuple(c) for c in cands}
        assert 1 <= len(hyps) <= min(beam, len(unique))
        assert len({tuple(h.tokens) for h in hyps}) == len(hyps)
        for h in hyps:
            assert tuple(h.tokens) in unique and h.tokens in trie
            assert h.logprob == pytest.approx(cand_scores[cands.index(h.tokens)], abs=1e-4)
        assert all(len(h.tokens) <= max(max_new, len(c)) for h in hyps for c in [h.tokens])
        if beam >= len(unique) and max_new >= trie.max_tokens:  # all paths fit in the beam: exact search
            assert {tuple(h.tokens) for h in hyps} == unique
            assert hyps[0].score == pytest.approx(max(cand_scores), abs=1e-4)


def test_trie_children_and_validation():
    trie = TrieConstraint([[4, 5], [4, 11], [7], [7, 8], [7]])
    assert trie.allowed([]) == [4, 7]
    assert trie.allowed([4]) == [5, 11]
    assert trie.allowed([7]) == [EOS, 8]
    assert trie.allowed([4, 5]) == [EOS]
    assert trie.allowed([9]) == []
    assert [7] in trie and [7, 8] in trie and [4] not in trie
    assert len(trie) == 4 and trie.max_tokens == 2
    trie_wide = TrieConstraint([[1, 23], [1, 3]], eos_id=99)  # "1 23" must not look like "1 2"
    assert trie_wide.allowed([1]) == [3, 23]
    assert trie_wide.allowed([1, 2]) == []
    with pytest.raises(ValueError, match="at least one"):
        TrieConstraint([])
    with pytest.raises(ValueError, match="candidate 1 is empty"):
        TrieConstraint([[4], []])
    with pytest.raises(ValueError, match="eos"):
        TrieConstraint([[4, EOS, 5]])


@pytest.mark.parametrize("max_new", [2, 4, 10])
@pytest.mark.parametrize("beam", [1, 3])
def test_token_range_exact_len(max_new, beam):
    model = FakeModel(seed=6, bias={EOS: 4.0})
    enc = encoded(model, 2)
    constraint = TokenRangeConstraint(5, 9, exact_len=4)
    results = generate(model, enc, GenerationConfig(max_new_tokens=max_new, beam_size=beam), constraint)
    for hyps in results:
        assert len(hyps) == beam
        for h in hyps:
            assert len(h.tokens) == 4 and all(5 <= t < 9 for t in h.tokens)
    free = generate(model, enc, GenerationConfig(max_new_tokens=3), TokenRangeConstraint(5, 9))
    assert all(all(5 <= t < 9 for t in r[0].tokens) for r in free)


def test_min_new_tokens():
    model = FakeModel(seed=7, bias={EOS: 8.0})
    enc = encoded(model, 3)
    assert all(r[0].tokens == [] for r in generate(model, enc, GenerationConfig(max_new_tokens=6)))
    for config in (
        GenerationConfig(max_new_tokens=6, min_new_tokens=3),
        GenerationConfig(max_new_tokens=6, min_new_tokens=3, beam_size=3),
        GenerationConfig(max_new_tokens=6, min_new_tokens=3, do_sample=True, seed=0, beam_size=2),
    ):
        for hyps in generate(model, enc, config, prefix=PREFIX):
            assert hyps and all(len(h.tokens) >= 3 for h in hyps)


def ngrams(tokens: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("beam", [1, 3])
def test_no_repeat_ngram(n, beam):
    model = FakeModel(seed=8, bias={5: 6.0, 6: 5.0})
    enc = encoded(model, 2)
    repeats = generate(model, enc, GenerationConfig(max_new_tokens=8))
    assert any(len(set(ngrams(r[0].tokens, n))) < len(ngrams(r[0].tokens, n)) for r in repeats)
    config = GenerationConfig(max_new_tokens=8, beam_size=beam, no_repeat_ngram_size=n)
    for hyps in generate(model, enc, config, prefix=[[5, 5, 5], [6]]):
        for h in hyps:
            grams = ngrams(h.tokens, n)
            assert len(set(grams)) == len(grams)


def test_sampling_is_seeded():
    model = FakeModel(seed=9, scale=0.2)
    enc = encoded(model, 3)
    config = lambda seed: GenerationConfig(max_new_tokens=8, do_sample=True, seed=seed, beam_size=2)
    run = lambda seed: [[h.tokens for h in r] for r in generate(model, enc, config(seed))]
    assert run(0) == run(0)
    assert run(0) != run(1)
    assert all(len(r) == 2 for r in run(None))


def test_top_k_one_and_tiny_top_p_or_temperature_equal_greedy():
    model = FakeModel(seed=10)
    enc = encoded(model, 3)
    greedy = generate(model, enc, GenerationConfig(max_new_tokens=6), prefix=PREFIX)
    for config in (
        GenerationConfig(max_new_tokens=6, do_sample=True, top_k=1, temperature=0.7, seed=1),
        GenerationConfig(max_new_tokens=6, do_sample=True, top_p=1e-6, seed=2),
        # 0 in float32: top-p would drop every token, lprobs / T would be NaN (both crashed multinomial)
        GenerationConfig(max_new_tokens=6, do_sample=True, top_p=5e-324, seed=3),
        GenerationConfig(max_new_tokens=6, do_sample=True, temperature=5e-324, seed=4),
    ):
        sampled = generate(model, enc, config, prefix=PREFIX)
        assert [(r[0].tokens, r[0].score) for r in sampled] == [(r[0].tokens, r[0].score) for r in greedy]


def results_of(results) -> list[list[tuple]]:
    return [[(h.tokens, h.score, h.token_logprobs) for h in hyps] for hyps in results]


@pytest.mark.parametrize(
    "config",
    [
        GenerationConfig(max_new_tokens=10),
        GenerationConfig(max_new_tokens=10, do_sample=True, seed=0),
        GenerationConfig(max_new_tokens=10, do_sample=True, seed=0, beam_size=2, top_k=6),
    ],
    ids=["greedy", "sampling", "two-draws"],
)
def test_steps_give_the_tokens_generate_gives(config):
    """Ragged prefixes (not streamed), samples ending at different steps: every slot's tokens as the
    steps hand them on are its hypothesis, and the results are generate's bit for bit."""
    model = FakeModel(seed=0, bias={EOS: 2.0})
    enc = encoded(model, 3, seed=0)
    expected = generate(model, enc, config, prefix=PREFIX)
    decoding = Decoding(model, enc, config, prefix=PREFIX)
    streamed: dict[int, list[int]] = {}
    ended: dict[int, int] = {}
    for i, step in enumerate(decoding):
        for slot, token in step.pairs():
            assert slot not in ended
            streamed.setdefault(slot, []).append(token)
        ended.update(dict.fromkeys(step.ended, i))
    assert results_of(decoding.results) == results_of(expected)
    k = decoding.per_sample
    assert decoding.streams == (k == 1) and sorted(ended) == list(range(3 * k))
    assert len(set(ended.values())) > 1, "every sample ended at the same step: pick another model"
    for b, hyps in enumerate(expected):
        slots = sorted(streamed.get(b * k + d, []) for d in range(k))
        assert slots == sorted(h.tokens for h in hyps)


def test_cancel_drops_samples_and_ends_the_search_early():
    model = FakeModel(seed=0, bias={EOS: 2.0})
    enc = encoded(model, 3, seed=0)
    config = GenerationConfig(max_new_tokens=10)
    expected = generate(model, enc, config, prefix=PREFIX)
    assert len(expected[1][0].tokens) == 10  # sample 1 would run longest
    full_steps = sum(1 for _ in Decoding(model, enc, config, prefix=PREFIX))
    decoding = Decoding(model, enc, config, prefix=PREFIX)
    seen: list[tuple[int, int]] = []
    steps = 0
    for step in decoding:
        steps += 1
        seen += step.pairs()
        if any(slot == 1 for slot, _ in step.pairs()):
            decoding.cancel([1])
    assert decoding.results[1] == [] and [t for s, t in seen if s == 1] == expected[1][0].tokens[:1]
    for b in (0, 2):
        assert decoding.results[b][0].tokens == expected[b][0].tokens
        assert decoding.results[b][0].score == pytest.approx(expected[b][0].score, abs=1e-5)
    assert steps < full_steps  # the batch ended when the short samples did

    everyone = Decoding(model, enc, config)
    steps = 0
    for _ in everyone:
        steps += 1
        everyone.cancel(range(3))
    assert steps == 1 and everyone.results == [[], [], []]

    beam_config = GenerationConfig(max_new_tokens=6, beam_size=3)
    beam = Decoding(model, enc, beam_config, prefix=PREFIX)
    assert not beam.streams
    for step in beam:
        assert step.pairs() == [] and step.ended == []
        beam.cancel([0])
    beam_expected = generate(model, enc, beam_config, prefix=PREFIX)
    assert beam.results[0] == []
    assert [[h.tokens for h in r] for r in beam.results[1:]] == [
        [h.tokens for h in r] for r in beam_expected[1:]
    ]


def test_top_k_top_p_filter():
    scores = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.3, 0.6]]).log()
    kept = lambda k, p: torch.isfinite(_filter_top_k_top_p(scores, k, p)).tolist()
    assert kept(0, 0.45) == [[True, False, False], [False, False, True]]
    assert kept(0, 0.7) == [[True, True, False], [False, True, True]]
    assert kept(2, 1.0) == [[True, True, False], [False, True, True]]
    assert kept(1, 0.9) == [[True, False, False], [False, False, True]]
    assert kept(0, 5e-324) == kept(1, 1.0)  # a top_p that rounds to 0 still keeps the best token


def test_huge_temperature_samples_without_nan():
    """A temperature past float32's range made lprobs / T NaN (-inf / inf for banned tokens)."""
    model = FakeModel(seed=11)
    enc = encoded(model, 2)
    config = GenerationConfig(max_new_tokens=5, do_sample=True, temperature=1e300, seed=0)
    for hyps in generate(model, enc, config):
        assert len(hyps[0].tokens) <= 5 and math.isfinite(hyps[0].score)


@pytest.mark.parametrize("beam", [1, 3])
def test_max_new_tokens_forces_eos(beam):
    model = FakeModel(seed=13, bias={EOS: -20.0})
    enc = encoded(model, 2)
    for hyps in generate(model, enc, GenerationConfig(max_new_tokens=5, beam_size=beam)):
        assert [len(h.tokens) for h in hyps] == [5] * beam
        assert all(h.token_logprobs[-1] < -10 for h in hyps)  # the forced eos is scored


def test_prefix_is_forced_not_returned_nor_scored():
    model = FakeModel(seed=11, bias={9: 3.0})
    enc = encoded(model, 3)
    prefix = [[9, 9, 9, 9], [], [9]]
    results = generate(model, enc, GenerationConfig(max_new_tokens=4, beam_size=2), prefix=prefix)
    check_against_recomputation(model, enc, results, prefix, 1.0)
    for hyps in results:
        assert all(len(h.token_logprobs) == len(h.tokens) + 1 and len(h.tokens) <= 4 for h in hyps)
    with pytest.raises(ValueError, match="eos"):
        generate(model, enc, GenerationConfig(), prefix=[[4, EOS], [], []])
    with pytest.raises(ValueError, match="prefixes"):
        generate(model, enc, GenerationConfig(), prefix=[[4]])


def test_score_candidates_and_best_candidate():
    model = FakeModel(seed=12)
    enc = encoded(model, 3)
    cands = [[[4], [4, 5, 6], [7, 8]], [[9]], []]
    prefix = [[5], [], [6, 6]]
    scores = score_candidates(model, enc, cands, prefix=prefix)
    chunked = score_candidates(model, enc, cands, chunk_size=2, prefix=prefix)
    assert [len(s) for s in chunked] == [3, 1, 0]
    assert sum(chunked, []) == pytest.approx(sum(scores, []), abs=1e-5)
    for b, sample in enumerate(cands):
        for c, s in zip(sample, scores[b], strict=True):
            manual = full_logprobs(model, enc, b, [BOS, *prefix[b], *c, EOS])[len(prefix[b]) :].sum()
            assert s == pytest.approx(manual.item(), abs=1e-5)
    two = enc.index_select(torch.tensor([0, 1]))
    best = best_candidate(model, two, cands[:2], prefix=prefix[:2])
    assert [i for i, _ in best] == [max(range(len(s)), key=s.__getitem__) for s in scores[:2]]
    assert [s for _, s in best] == pytest.approx([max(s) for s in scores[:2]])
    with pytest.raises(ValueError, match="at least one candidate"):
        best_candidate(model, enc, cands)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0),
        ("min_new_tokens", -1),
        ("min_new_tokens", 40),
        ("beam_size", 0),
        ("temperature", 0.0),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("length_penalty", float("nan")),
        ("no_repeat_ngram_size", -2),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"GenerationConfig.{field}"):
        GenerationConfig(**{field: value})
