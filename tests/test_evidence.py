"""Verdicts written after their evidence (OFAConfig.answer_evidence): the shapes world's evidence is
true, targets and parses round-trip, decoding reaches a candidate, and the option off changes nothing."""

import random

import pytest
from PIL import Image

from ofa_unified.data import shapes
from ofa_unified.data.pipeline import build_example
from ofa_unified.data.preprocess import ImageTransform
from ofa_unified.generate import EvidenceConstraint, TrieConstraint
from ofa_unified.inference import Predictor, Request
from ofa_unified.model import build_model
from ofa_unified.tasks import EVIDENCE_SEPARATOR, answer_trie, evidence_constraint, get_task
from ofa_unified.vocab import EOS, Vocab, train_sentencepiece

CORPUS = [
    "is there a small red circle? small circles: blue, green answer: no",
    "a large green diamond and a small red triangle answer: yes",
    "the red circle is left of the blue star. stars: orange shapes: none",
] * 4


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> Vocab:
    model = train_sentencepiece(CORPUS, tmp_path_factory.mktemp("spm"), vocab_size=320)
    return Vocab.from_sentencepiece(model, num_codes=16, num_bins=32)


def ids(vocab: Vocab, text: str) -> list[int]:
    return vocab.encode(text, add_bos=False, add_eos=False)


def records(n: int = 150):
    for i in range(n):
        _, scene = shapes.sample("train", i)
        yield scene, shapes.scene_records(scene, shapes.record_rng(scene.seed), ["vqa", "itm"])


def test_shapes_evidence_settles_the_answer():
    """Existence: yes iff the named value is in the listed ones; relation: yes iff the stated relation
    is the asked one; ITM: yes iff the evidence (the true claim a negative was made from) is the text."""
    seen = {"existence": 0, "relation": 0, "itm": 0}
    for _, recs in records():
        for r in recs:
            if r["task"] == "itm":
                assert (r["evidence"] == r["text"]) == (r["label"] == "yes"), r
                seen["itm"] += 1
            elif r["question_type"] == "existence":
                listed = r["evidence"].split(": ", 1)[1]
                values = [] if listed == "none" else listed.split(", ")
                question = r["question"].removeprefix("is there ").removesuffix("?").split()[1:]
                named = next(w for key in ("color", "shape", "size") for w in question if w in _pool(key))
                assert (named in values) == (r["answers"][0] == "yes"), r
                seen["existence"] += 1
            elif r["question_type"] == "relation":
                asked = next(rel for rel in shapes._RELATIONS if f" {rel} " in r["question"])
                assert (f" is {asked} " in r["evidence"]) == (r["answers"][0] == "yes"), r
                seen["relation"] += 1
            else:
                assert "evidence" not in r, r
    assert min(seen.values()) >= 100, seen


def _pool(key: str) -> tuple[str, ...]:
    return {"color": tuple(shapes.COLORS), "shape": shapes.SHAPES, "size": shapes.SIZES}[key]


@pytest.mark.parametrize(
    ("task", "record", "answer"),
    [
        ("itm", {"text": "a red circle", "label": "no", "evidence": "a blue circle"}, "no"),
        ("vqa", {"question": "is there a red circle?", "answers": ["no"], "evidence": "circles: blue"}, "no"),
    ],
)
def test_target_and_parse_round_trip(vocab, task, record, answer):
    t = get_task(task)
    target = t.target(record, (64, 64), vocab)
    assert target == f" {record['evidence']}{EVIDENCE_SEPARATOR} {answer}"
    parsed = t.parse(ids(vocab, target), vocab, (64, 64))
    assert parsed == {"answer": answer, "evidence": record["evidence"]}
    bare = {k: v for k, v in record.items() if k != "evidence"}
    assert t.target(bare, (64, 64), vocab) == f" {answer}"
    assert t.parse(ids(vocab, f" {answer}"), vocab, (64, 64)) == {"answer": answer}


def test_build_example_uses_evidence_only_when_asked(vocab):
    record = {"task": "itm", "text": "a red circle", "label": "no", "evidence": "a blue circle"}
    image, transform = Image.new("RGB", (32, 32)), ImageTransform(32)
    off = build_example(image, record, vocab, transform, random.Random(0))
    on = build_example(image, record, vocab, transform, random.Random(0), evidence=True)
    assert off.target_ids == ids(vocab, " no")
    assert on.target_ids == ids(vocab, f" a blue circle{EVIDENCE_SEPARATOR} no")


def test_evidence_constraint_walk(vocab):
    trie = answer_trie(vocab, ["yes", "no", "red"])
    c = evidence_constraint(vocab, trie)
    assert isinstance(c, EvidenceConstraint)
    text = set(range(EOS + 1, vocab.code_offset))
    # evidence may use any subword; eos only where the text is itself a candidate
    assert set(c.allowed([])) == text
    assert set(c.allowed(ids(vocab, " red"))) == text | {EOS}
    evidence = ids(vocab, " circles: blue")
    assert set(c.allowed(evidence)) == text
    # after the separator: exactly the trie
    sep = evidence + ids(vocab, EVIDENCE_SEPARATOR)
    assert list(c.allowed(sep)) == trie.allowed([])
    assert list(c.allowed(sep + ids(vocab, " no"))) == [EOS]
    assert c.max_tokens >= len(sep) + trie.max_tokens
    other = TrieConstraint([[5]])
    assert evidence_constraint(vocab, None) is None
    assert isinstance(evidence_constraint(vocab, other), EvidenceConstraint)


def test_predictor_decodes_a_label_with_evidence(vocab):
    """A random model with answer_evidence: ITM goes through the evidence constraint and any answer
    is a label, whatever it writes before."""
    model = build_model("micro", vocab_size=len(vocab), answer_evidence=True)
    predictor = Predictor(model, vocab, image_size=32)
    req = Request(Image.new("RGB", (32, 32), "red"), task="itm", fields={"text": "a red circle"})
    assert isinstance(predictor._prepare(req).constraint, EvidenceConstraint)
    result = predictor.predict([req])[0]
    assert result["answer"] in ("yes", "no"), result
    plain = Predictor(build_model("micro", vocab_size=len(vocab)), vocab, image_size=32)
    assert isinstance(plain._prepare(req).constraint, TrieConstraint)


def test_evidence_is_closed_at_its_budget(vocab):
    trie = answer_trie(vocab, ["yes", "no"])
    sep = ids(vocab, EVIDENCE_SEPARATOR)
    c = EvidenceConstraint(trie, sep, range(EOS + 1, vocab.code_offset), max_evidence=3)
    long = ids(vocab, " circles: blue, green")[:3]
    assert list(c.allowed(long)) == [sep[0]]
    if len(sep) > 1:
        assert list(c.allowed(long + sep[:1])) == [sep[1]]
    assert list(c.allowed(long + sep)) == trie.allowed([])


def test_candidates_answer_is_split_from_its_evidence(vocab):
    """A request's own candidate list: the answer is the candidate, the evidence comes beside it."""
    model = build_model("micro", vocab_size=len(vocab), answer_evidence=True)
    predictor = Predictor(model, vocab, image_size=32)
    req = Request(
        Image.new("RGB", (32, 32)),
        task="vqa",
        fields={"question": "is there a red circle?"},
        candidates=["yes", "no"],
    )
    result = predictor.predict([req])[0]
    assert result["answer"] in ("yes", "no"), result
    assert ("evidence" in result) == (EVIDENCE_SEPARATOR.strip() in result["text"]), result


def test_verdict_probabilities_follow_the_evidence(vocab):
    """Label probabilities of an evidence model are scored after the evidence it wrote; itm_scores
    (retrieval re-ranking) reads the same number."""
    model = build_model("micro", vocab_size=len(vocab), answer_evidence=True)
    predictor = Predictor(model, vocab, image_size=32)
    image = Image.new("RGB", (32, 32), "blue")
    result = predictor.predict([Request(image, task="itm", fields={"text": "a red circle"})])[0]
    probs = result["probabilities"]
    assert set(probs) == {"yes", "no"} and abs(sum(probs.values()) - 1) < 1e-6
    prefix = predictor._evidence_prefix(result["tokens"])
    assert result["tokens"][: len(prefix)] == prefix
    assert predictor.itm_scores([(image, "a red circle")]) == pytest.approx([probs["yes"]])
