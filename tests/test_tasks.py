"""Task definitions: OFA's templates, targets, constraints, parse round trips and malformed outputs."""

import json
import random

import pytest

from ofa_unified import tasks
from ofa_unified.generate import GenerationConfig, TokenRangeConstraint, TrieConstraint
from ofa_unified.tasks import ParseError, UnknownTaskError, get_task
from ofa_unified.vocab import EOS, Vocab, train_sentencepiece

NUM_CODES, NUM_BINS = 32, 100
SIZE = (200.0, 100.0)  # W, H: different, so x and y scaling are both exercised
HALF_BIN = (SIZE[0] / (NUM_BINS - 1) / 2, SIZE[1] / (NUM_BINS - 1) / 2)

CORPUS = [
    "a red circle above a blue square",
    "a small green triangle next to a large yellow star",
    "what color is the circle? red. how many shapes are there? two",
    "yes no maybe the purple star is left of the orange circle",
    "does the image describe what is the answer to question",
] * 4

RECORDS = {
    "caption": {"captions": ["a red circle", "one red circle on grass"]},
    "vqa": {"question": "what color is the circle", "answers": ["red", "blue", "red"]},
    "grounding": {"text": "the red circle", "box": [20.0, 10.0, 120.0, 60.0]},
    "grounded_caption": {"box": [20.0, 10.0, 120.0, 60.0], "text": "the red circle"},
    "itm": {"text": "a red circle", "label": "yes"},
    "detection": {
        "objects": [
            {"box": [100.0, 50.0, 150.0, 90.0], "label": "blue square"},
            {"box": [10.0, 5.0, 60.0, 40.0], "label": "red circle"},
        ]
    },
    "image_infilling": {"target_codes": [3, 1, 4, 1]},
    "text_to_image": {"caption": "a red circle", "target_codes": [2, 7, 1, 8, 2, 8, 1, 8, 2]},
    "masked_image_modeling": {"target_codes": [5, 3, 5, 8], "masked_patches": [0, 2]},
    "text_infilling": {"text": "a small green triangle next to a large yellow star"},
    "visual_entailment": {"text1": "a red circle", "text2": "a circle", "label": "maybe"},
    "qa_matching": {"question": "what color is the circle", "answer": "red", "label": "no"},
    "prefix_lm": {"text": "a small green triangle next to a large yellow star"},
    "itc": {"text": "a red circle"},  # no decoder target: embedded, never parsed
}


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> Vocab:
    model = train_sentencepiece(CORPUS, tmp_path_factory.mktemp("spm"), vocab_size=320)
    return Vocab.from_sentencepiece(model, num_codes=NUM_CODES, num_bins=NUM_BINS)


def ids(vocab: Vocab, text: str) -> list[int]:
    return vocab.encode(text, add_bos=False, add_eos=False)


def test_registry_matches_templates_file():
    assert tasks.list_tasks() == sorted(tasks.load_templates())
    assert set(tasks.list_tasks()) == set(RECORDS)
    with open(tasks.TEMPLATES_PATH, encoding="utf-8") as f:
        assert json.load(f)["caption"]["template"] == " what does the image describe?"


def test_unknown_task_lists_known_names():
    with pytest.raises(UnknownTaskError, match="caption.*visual_entailment") as err:
        get_task("captioning")
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("caption", " what does the image describe?"),
        ("vqa", " what color is the circle?"),
        ("grounding", ' which region does the text " the red circle " describe?'),
        ("grounded_caption", "  what does the region describe? region:<bin_10> <bin_10> <bin_59> <bin_59>"),
        ("itm", ' does the image describe " a red circle "?'),
        ("detection", " what are the objects in the image?"),
        ("image_infilling", " what is the image in the middle part?"),
        ("text_to_image", " what is the complete image? caption: a red circle"),
        ("visual_entailment", ' can image and text1 " a red circle " imply text2 " a circle "?'),
        ("qa_matching", ' what is the answer to question " what color is the circle ". is " red "?'),
    ],
)
def test_sources_are_ofa_templates(vocab, name, expected):
    assert get_task(name).source(RECORDS[name], SIZE, vocab) == expected


def test_grounded_caption_source_ends_with_four_bins(vocab):
    src = ids(vocab, get_task("grounded_caption").source(RECORDS["grounded_caption"], SIZE, vocab))
    assert [vocab.is_bin(t) for t in src[-5:]] == [False, True, True, True, True]


def test_text_infilling_masks_one_seeded_span(vocab):
    task, record = get_task("text_infilling"), RECORDS["text_infilling"]
    src = task.source(record, SIZE, vocab)
    assert src == task.source(dict(record), SIZE, vocab)  # same record, same mask
    prefix, inner = ' what is the complete text of " ', src.removeprefix(' what is the complete text of " ')
    assert src.startswith(prefix) and inner.endswith(' "?')
    words = inner.removesuffix(' "?').split()
    assert words.count("<mask>") == 1 and len(words) < len(record["text"].split())
    given = task.source({"text": "a b c", "masked_text": "a <mask> c"}, SIZE, vocab)
    assert given == ' what is the complete text of " a <mask> c "?'
    assert ids(vocab, src).count(vocab.mask_id) == 1


def test_missing_source_field_is_named(vocab):
    with pytest.raises(ValueError, match="question"):
        get_task("vqa").source({"answers": ["red"]}, SIZE, vocab)


def test_targets(vocab):
    assert get_task("caption").target(RECORDS["caption"], SIZE, vocab) == " a red circle"
    picked = {
        get_task("caption").target(RECORDS["caption"], SIZE, vocab, random.Random(s)) for s in range(20)
    }
    assert picked == {" a red circle", " one red circle on grass"}
    assert get_task("vqa").target(RECORDS["vqa"], SIZE, vocab) == " red"
    assert get_task("itm").target(RECORDS["itm"], SIZE, vocab) == " yes"
    assert get_task("visual_entailment").target(RECORDS["visual_entailment"], SIZE, vocab) == " maybe"
    assert (
        get_task("grounding").target(RECORDS["grounding"], SIZE, vocab)
        == "<bin_10> <bin_10> <bin_59> <bin_59>"
    )
    det = get_task("detection").target(RECORDS["detection"], SIZE, vocab)
    assert (
        det == "<bin_5> <bin_5> <bin_30> <bin_40> red circle <bin_50> <bin_50> <bin_74> <bin_89> blue square"
    )
    assert get_task("image_infilling").target(RECORDS["image_infilling"], SIZE, vocab) == (
        "<code_3> <code_1> <code_4> <code_1>"
    )
    assert get_task("text_infilling").target(RECORDS["text_infilling"], SIZE, vocab) == (
        " " + RECORDS["text_infilling"]["text"]
    )


def test_target_errors(vocab):
    with pytest.raises(ValueError, match="target_codes"):
        get_task("text_to_image").target({"caption": "a red circle"}, SIZE, vocab)
    with pytest.raises(ValueError, match="yes"):
        get_task("itm").target({"text": "x", "label": "perhaps"}, SIZE, vocab)


@pytest.mark.parametrize("name", sorted(set(RECORDS) - {"itc"}))
def test_target_parse_round_trip(vocab, name):
    task, record = get_task(name), RECORDS[name]
    target = task.target(record, SIZE, vocab)
    out = task.parse(ids(vocab, target), vocab, SIZE, record)
    if name in ("caption", "grounded_caption", "text_infilling", "prefix_lm"):
        assert out == {"text": target.strip()}
    elif name in ("vqa", "itm", "visual_entailment", "qa_matching"):
        assert out == {"answer": target.strip()}
    elif name == "grounding":
        assert_box_close(out["box"], record["box"])
    elif name == "detection":
        want = sorted(record["objects"], key=lambda o: o["box"][1])
        assert [o["label"] for o in out["objects"]] == [o["label"] for o in want]
        for got, obj in zip(out["objects"], want, strict=True):
            assert_box_close(got["box"], obj["box"])
    else:
        assert out == {"codes": record["target_codes"]}


def assert_box_close(got, want):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert abs(g - w) <= HALF_BIN[i % 2] + 1e-9, (got, want)


def test_parse_tolerates_final_eos(vocab):
    tokens = [*ids(vocab, " yes"), EOS]
    assert get_task("itm").parse(tokens, vocab, SIZE) == {"answer": "yes"}


def _bins(vocab, *bins):
    return [vocab.bin_id(b) for b in bins]


MALFORMED = {
    "caption": [lambda v: [], lambda v: [*ids(v, " a red"), v.bin_id(3)], lambda v: [v.code_id(0)]],
    "grounded_caption": [lambda v: _bins(v, 1, 2, 3, 4)],
    "text_infilling": [lambda v: [EOS]],
    "prefix_lm": [lambda v: [EOS], lambda v: [*ids(v, " a red"), v.bin_id(3)]],
    "itc": [lambda v: ids(v, " a red circle")],
    "vqa": [lambda v: [], lambda v: [*ids(v, " red"), v.code_id(1)]],
    "itm": [lambda v: ids(v, " maybe"), lambda v: _bins(v, 1), lambda v: []],
    "visual_entailment": [lambda v: ids(v, " red")],
    "qa_matching": [lambda v: ids(v, " yes no")],
    "grounding": [
        lambda v: _bins(v, 1, 2, 3),
        lambda v: _bins(v, 1, 2, 3, 4, 5),
        lambda v: ids(v, " red circle"),
        lambda v: _bins(v, 50, 2, 10, 60),  # x1 < x0
        lambda v: _bins(v, 1, 50, 10, 20),  # y1 < y0
        lambda v: [],
        lambda v: [len(v) + 5],
    ],
    "detection": [
        lambda v: _bins(v, 1, 2, 3, 4),  # no label
        lambda v: [*_bins(v, 1, 2, 3, 4), *ids(v, " red"), *_bins(v, 5, 6)],
        lambda v: [*ids(v, " red"), *_bins(v, 1, 2, 3, 4)],
        lambda v: [*_bins(v, 1, 2, 3, 4), v.code_id(2)],
        lambda v: [],
    ],
    "image_infilling": [
        lambda v: [v.code_id(1)] * 3,
        lambda v: [*[v.code_id(1)] * 3, v.bin_id(1)],
        lambda v: [],
    ],
    "text_to_image": [lambda v: ids(v, " red circle")],
    "masked_image_modeling": [lambda v: [v.code_id(1)] * 5, lambda v: [v.code_id(1), v.bin_id(2)] * 2],
}


@pytest.mark.parametrize("name, case", [(n, i) for n in sorted(MALFORMED) for i in range(len(MALFORMED[n]))])
def test_malformed_output_raises_parse_error(vocab, name, case):
    tokens = MALFORMED[name][case](vocab)
    with pytest.raises(ParseError):
        get_task(name).parse(tokens, vocab, SIZE, RECORDS[name])


def test_every_task_has_malformed_cases():
    assert set(MALFORMED) == set(tasks.list_tasks())


def test_image_parse_length_from_record_or_template(vocab):
    task = get_task("image_infilling")
    assert task.num_codes() == 16 * 16  # OFA's middle 128 x 128 px of a 256 px image
    assert task.num_codes({"code_grid": [2, 3]}) == 6
    assert task.num_codes({"code_grid": 4}) == 16
    assert task.parse([vocab.code_id(5)] * 6, vocab, SIZE, {"code_grid": [2, 3]}) == {"codes": [5] * 6}


def test_constraint_types(vocab):
    for name in ("caption", "grounded_caption", "detection", "text_infilling"):
        assert get_task(name).constraint(vocab, RECORDS[name]) is None
    assert get_task("vqa").constraint(vocab, RECORDS["vqa"]) is None
    grounding = get_task("grounding").constraint(vocab, RECORDS["grounding"])
    assert isinstance(grounding, TokenRangeConstraint) and grounding.exact_len == 4
    assert list(grounding.allowed([])) == list(range(vocab.bin_offset, len(vocab)))
    for name in ("image_infilling", "text_to_image", "masked_image_modeling"):
        c = get_task(name).constraint(vocab, RECORDS[name])
        assert isinstance(c, TokenRangeConstraint) and c.exact_len == len(RECORDS[name]["target_codes"])
        assert list(c.allowed([])) == list(range(vocab.code_offset, vocab.bin_offset))


@pytest.mark.parametrize(
    "name, answers",
    [("itm", ["yes", "no"]), ("qa_matching", ["yes", "no"]), ("visual_entailment", ["yes", "no", "maybe"])],
)
def test_label_tries_hold_exactly_the_encoded_labels(vocab, name, answers):
    trie = get_task(name).constraint(vocab, RECORDS[name])
    assert isinstance(trie, TrieConstraint) and len(trie) == len(answers)
    for a in answers:
        encoded = tasks.encode_answer(vocab, a)
        assert encoded in trie
        assert encoded == ids(vocab, get_task(name).target({**RECORDS[name], "label": a}, SIZE, vocab))
        assert get_task(name).parse(encoded, vocab, SIZE) == {"answer": a}


def test_vqa_trie_from_record_or_request(vocab):
    task = get_task("vqa")
    trie = task.constraint(vocab, {**RECORDS["vqa"], "candidates": ["red", "blue square"]})
    assert isinstance(trie, TrieConstraint) and tasks.encode_answer(vocab, "blue square") in trie
    request = task.constraint(vocab, RECORDS["vqa"], candidates=["two"])
    assert tasks.encode_answer(vocab, "two") in request and tasks.encode_answer(vocab, "red") not in request
    with pytest.raises(ValueError, match="non-empty"):
        task.constraint(vocab, RECORDS["vqa"], candidates=["red", "  "])


def test_generation_defaults():
    caption = get_task("caption").generation_config()
    assert isinstance(caption, GenerationConfig)
    assert (caption.beam_size, caption.max_new_tokens, caption.no_repeat_ngram_size) == (5, 16, 3)
    grounding = get_task("grounding").generation_config(beam_size=2)
    assert (grounding.beam_size, grounding.min_new_tokens, grounding.max_new_tokens) == (2, 4, 4)
    t2i = get_task("text_to_image").generation_config()
    assert t2i.do_sample and t2i.top_k == 256 and t2i.max_new_tokens == 32 * 32
    infill = get_task("image_infilling").generation_config({"code_grid": [2, 2]})
    assert infill.max_new_tokens == infill.min_new_tokens == 4


def test_evaluate_delegates_and_counts_failed_parses_as_wrong():
    grounding = get_task("grounding").evaluate([{"box": [20, 10, 120, 60]}, None], [RECORDS["grounding"]] * 2)
    assert grounding == {"acc@0.5": 0.5, "miou": 0.5}
    itm = get_task("itm").evaluate(
        [{"answer": "yes"}, {"answer": "yes"}], [{"label": "yes"}, {"label": "no"}]
    )
    assert itm == {"accuracy": 0.5, "top_answer_share": 1.0}
    vqa = get_task("vqa").evaluate([{"answer": "red"}], [{"answers": ["red"] * 10}])
    assert vqa == {"vqa_accuracy": 1.0}
    typed = [
        {"answers": ["red"] * 10, "question_type": "color"},
        {"answers": ["yes"] * 10, "question_type": "existence"},
    ]
    vqa = get_task("vqa").evaluate([{"answer": "red"}, {"answer": "no"}], typed)
    assert vqa == {"vqa_accuracy": 0.5, "vqa_accuracy/color": 1.0, "vqa_accuracy/existence": 0.0}
    det = get_task("detection").evaluate([dict(RECORDS["detection"])], [RECORDS["detection"]])
    assert det["map@0.5"] == pytest.approx(1.0)
    codes = get_task("text_to_image").evaluate([{"codes": [2, 7, 1]}], [{"target_codes": [2, 7, 0, 0]}])
    assert codes == {"code_accuracy": 0.5}
    text = get_task("text_infilling").evaluate([{"text": "A  b"}, None], [{"text": "a b"}, {"text": "c"}])
    assert text == {"exact_match": 0.5}
    for name in tasks.list_tasks():
        assert get_task(name).metric_name


def test_instruction_source():
    assert tasks.instruction_source("what is this?") == " what is this?"
    assert tasks.instruction_source(" what is this?") == " what is this?"
    for bad in ("", "   \n"):
        with pytest.raises(ValueError):
            tasks.instruction_source(bad)


def test_parse_free_collects_text_boxes_and_codes(vocab):
    tokens = [*ids(vocab, " a red circle"), *_bins(vocab, 0, 0, 99, 99, 5), vocab.code_id(7)]
    out = tasks.parse_free(tokens, vocab, SIZE)
    assert out["text"] == "a red circle"
    assert out["boxes"] == [[0.0, 0.0, SIZE[0], SIZE[1]]]
    assert out["codes"] == [7]
    assert out["stray_bins"] == [5]
    with pytest.raises(ParseError):
        tasks.parse_free([len(vocab)], vocab, SIZE)


def test_masked_image_modeling_scores_only_the_masked_positions():
    task = get_task("masked_image_modeling")
    record = {"target_codes": [1, 2, 3, 4], "masked_patches": [1, 3]}
    assert task.loss_positions(record) == [1, 3] and get_task("caption").loss_positions(record) is None
    right_where_masked = {"codes": [9, 2, 9, 4]}
    assert task.evaluate([right_where_masked], [record]) == {"masked_code_accuracy": 1.0}
    assert task.evaluate([{"codes": [1, 2]}, None], [record, record])["masked_code_accuracy"] == 0.25
