"""Joint vocabulary: id layout, bins and boxes, literal special tokens, both text backends, persistence."""

import json
import pickle
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers.implementations import ByteLevelBPETokenizer

from ofa_unified.vocab import (
    BOS,
    EOS,
    TokenizerMissingError,
    Vocab,
    cli_train,
    dequantize,
    quantize,
    train_sentencepiece,
)

K, B = 64, 100  # small codebook and bin count keep the layout easy to check


def make_corpus(n: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    colors = ["red", "green", "blue", "yellow", "purple"]
    shapes = ["circle", "square", "triangle", "star"]
    places = ["left of", "right of", "above", "below"]
    out = []
    for _ in range(n):
        a, b = rng.choice(colors), rng.choice(colors)
        s, t = rng.choice(shapes), rng.choice(shapes)
        out.append(f"a {rng.choice(['small', 'large'])} {a} {s} is {rng.choice(places)} the {b} {t}.")
    return out


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    train_sentencepiece(make_corpus(), d, vocab_size=400)
    return d


@pytest.fixture(scope="module")
def sp_vocab(sp_dir):
    return Vocab.from_sentencepiece(sp_dir / "spm.model", K, B)


def write_bart_files(d, with_mask: bool = True):
    """A tiny byte-level BPE in BART's format: <s> <pad> </s> <unk> at 0-3, <mask> last."""
    tok = ByteLevelBPETokenizer()
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tok.train_from_iterator(
        make_corpus(), vocab_size=400, min_frequency=1, special_tokens=specials, show_progress=False
    )
    d.mkdir(parents=True, exist_ok=True)
    tok.save_model(str(d))
    vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
    if with_mask:
        vocab["<mask>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    return d / "vocab.json", d / "merges.txt", vocab


@pytest.fixture(scope="module")
def bart_files(tmp_path_factory):
    return write_bart_files(tmp_path_factory.mktemp("bart"))


# --- bins and boxes ---------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, database=None)
@given(
    frac=st.floats(0.0, 1.0),
    size=st.floats(1e-3, 1e5, allow_nan=False, allow_infinity=False),
    num_bins=st.integers(2, 5000),
)
def test_quantize_round_trip_within_half_bin(frac, size, num_bins):
    v = frac * size
    b = quantize(v, size, num_bins)
    assert 0 <= b < num_bins
    assert abs(dequantize(b, size, num_bins) - v) <= size / (num_bins - 1) / 2 + 1e-9 * size


def test_quantize_clamps_and_rejects_bad_input():
    assert quantize(-5.0, 10.0, 11) == 0
    assert quantize(15.0, 10.0, 11) == 10
    assert quantize(float("inf"), 10.0, 11) == 10
    assert quantize(3.0, 10.0, 11) == 3
    for args in [(float("nan"), 10.0, 11), (1.0, 0.0, 11), (1.0, 10.0, 1)]:
        with pytest.raises(ValueError):
            quantize(*args)
    with pytest.raises(ValueError, match="out of range"):
        dequantize(11, 10.0, 11)


def test_box_tokens_are_x0_y0_x1_y1_and_round_trip():
    vocab = Vocab.without_text(subword_size=10, num_codes=K, num_bins=1001)
    # width 1000 and height 500: x and y get different bins for the same pixel value.
    ids = vocab.box_to_tokens([100, 100, 300, 400], width=1000, height=500)
    assert ids == [vocab.bin_id(100), vocab.bin_id(200), vocab.bin_id(300), vocab.bin_id(800)]
    assert vocab.tokens_to_box(ids, width=1000, height=500) == pytest.approx([100, 100, 300, 400])
    assert vocab.decode(ids) == "<bin_100> <bin_200> <bin_300> <bin_800>"
    with pytest.raises(ValueError, match="4 bin ids"):
        vocab.tokens_to_box([*ids[:3], vocab.code_id(0)], 1000, 500)
    with pytest.raises(ValueError, match="4 bin ids"):
        vocab.tokens_to_box(ids[:3], 1000, 500)
    with pytest.raises(ValueError, match="x0, y0, x1, y1"):
        vocab.box_to_tokens([1, 2, 3], 10, 10)


# --- layout -----------------------------------------------------------------------------------------


def test_official_ofa_layout():
    vocab = Vocab.without_text(subword_size=50264, num_codes=8192, num_bins=1000)
    assert (vocab.bos_id, vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2, 3)
    assert vocab.mask_id == 50264
    assert vocab.code_id(0) == 50265 and vocab.code_id(8191) == 58456
    assert vocab.bin_id(0) == 58457 and vocab.bin_id(999) == 59456
    assert len(vocab) == 59457
    assert (
        vocab.is_code(50265) and not vocab.is_code(58457) and vocab.is_bin(58457) and not vocab.is_bin(59457)
    )
    with pytest.raises(ValueError, match="code index 8192"):
        vocab.code_id(8192)
    with pytest.raises(ValueError, match="bin index -1"):
        vocab.bin_id(-1)


def test_sentencepiece_layout(sp_vocab):
    sp_size = sp_vocab.subword_size
    assert 4 + 256 < sp_size <= 400
    assert sp_vocab.mask_id == sp_size
    assert sp_vocab.code_offset == sp_size + 1 and sp_vocab.bin_offset == sp_size + 1 + K
    assert len(sp_vocab) == sp_size + 1 + K + B


# --- SentencePiece text -----------------------------------------------------------------------------


def test_train_sentencepiece_is_deterministic_and_handles_small_corpora(tmp_path, sp_dir):
    path = train_sentencepiece(make_corpus(), tmp_path / "again", vocab_size=400)
    assert path.read_bytes() == (sp_dir / "spm.model").read_bytes()
    big = Vocab.from_sentencepiece(
        train_sentencepiece(make_corpus(50), tmp_path / "big", vocab_size=5000), K, B
    )
    assert big.subword_size < 5000  # corpus too small to fill it: fewer pieces, no error
    with pytest.raises(ValueError, match="vocab_size=50"):
        train_sentencepiece(make_corpus(), tmp_path / "tiny", vocab_size=50)


@pytest.mark.parametrize(
    "text",
    ["a small red circle is left of the blue star.", "héllo wörld 😀 1234 ☃", "the yellow square?"],
)
def test_sentencepiece_text_round_trip(sp_vocab, text):
    ids = sp_vocab.encode(text)
    assert ids[0] == BOS and ids[-1] == EOS
    assert all(3 < i < sp_vocab.mask_id for i in ids[1:-1])
    assert sp_vocab.decode(ids) == text
    assert sp_vocab.decode(ids, skip_special=False) == f"<s> {text} </s>"
    assert sp_vocab.encode(text, add_bos=False, add_eos=False) == ids[1:-1]


def test_sentencepiece_normalizes_whitespace(sp_vocab):
    assert sp_vocab.decode(sp_vocab.encode("  what is   the red star? ")) == "what is the red star?"


def test_seen_text_is_compressed(sp_vocab):
    text = "a small red circle is left of the blue star."
    assert len(sp_vocab.encode(text, add_bos=False, add_eos=False)) <= len(text.split()) + 1


def test_literal_special_tokens_become_single_ids(sp_vocab):
    text = "what is <mask> in region <bin_7> <bin_12> <bin_0> <bin_99>? image <code_3><code_63>"
    ids = sp_vocab.encode(text, add_bos=False, add_eos=False)
    bins = [sp_vocab.bin_id(i) for i in (7, 12, 0, 99)]
    start = ids.index(bins[0])
    assert ids[start : start + 4] == bins
    assert ids[-2:] == [sp_vocab.code_id(3), sp_vocab.code_id(63)]
    assert ids.count(sp_vocab.mask_id) == 1
    assert (
        sp_vocab.decode(ids)
        == "what is <mask> in region <bin_7> <bin_12> <bin_0> <bin_99> ? image <code_3> <code_63>"
    )
    canonical = "the <mask> is red <bin_1> <bin_2> <bin_3> <bin_4>"
    assert sp_vocab.decode(sp_vocab.encode(canonical)) == canonical


def test_out_of_range_special_tokens_raise(sp_vocab):
    with pytest.raises(ValueError, match=r"<code_64> is out of range.*<code_0>\.\.<code_63>"):
        sp_vocab.encode("image <code_64>")
    with pytest.raises(ValueError, match=r"<bin_100> is out of range.*<bin_0>\.\.<bin_99>"):
        sp_vocab.encode("<bin_100> box")
    with pytest.raises(ValueError, match="token id"):
        sp_vocab.decode([len(sp_vocab)])


def test_save_load_gives_identical_ids(sp_vocab, tmp_path):
    sp_vocab.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["backend"] == "sentencepiece" and cfg["num_codes"] == K and cfg["num_bins"] == B
    assert cfg["mask_id"] == sp_vocab.mask_id and cfg["vocab_size"] == len(sp_vocab)
    for loaded in (Vocab.load(tmp_path), pickle.loads(pickle.dumps(sp_vocab))):
        assert (len(loaded), loaded.mask_id, loaded.code_offset, loaded.bin_offset) == (
            len(sp_vocab),
            sp_vocab.mask_id,
            sp_vocab.code_offset,
            sp_vocab.bin_offset,
        )
        for text in make_corpus(20, seed=1) + ["héllo <mask> 😀 <bin_3>"]:
            assert loaded.encode(text) == sp_vocab.encode(text)


def test_load_errors_name_the_file(sp_vocab, tmp_path):
    sp_vocab.save(tmp_path)
    (tmp_path / "spm.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="spm.model"):
        Vocab.load(tmp_path)
    (tmp_path / "spm.model").unlink()
    with pytest.raises(FileNotFoundError, match="spm.model"):
        Vocab.load(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Vocab.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        Vocab.load(tmp_path / "empty")


def test_cli_train_writes_a_loadable_directory(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(make_corpus(100)) + "\n", encoding="utf-8")
    cli_train(
        ["--input", str(corpus), "--out", str(tmp_path / "v"), "--vocab-size", "350", "--num-codes", "16"]
    )
    vocab = Vocab.load(tmp_path / "v")
    assert (vocab.num_codes, vocab.num_bins) == (16, 1000)
    assert vocab.decode(vocab.encode("a red star")) == "a red star"
    assert "saved" in capsys.readouterr().out


# --- GPT-2 byte-level BPE (official OFA checkpoints) ------------------------------------------------


def test_gpt2_layout_follows_vocab_json(bart_files):
    vocab_json, merges_txt, raw = bart_files
    vocab = Vocab.from_gpt2_bpe(vocab_json, merges_txt, num_codes=K, num_bins=B)
    assert vocab.mask_id == raw["<mask>"] == len(raw) - 1
    assert vocab.code_id(0) == len(raw) and vocab.bin_id(0) == len(raw) + K
    assert len(vocab) == len(raw) + K + B


def test_gpt2_keeps_leading_space_and_round_trips(bart_files):
    vocab_json, merges_txt, raw = bart_files
    vocab = Vocab.from_gpt2_bpe(vocab_json, merges_txt, num_codes=K, num_bins=B)
    id_to_token = {i: t for t, i in raw.items()}
    prompt = " what does the image describe?"
    ids = vocab.encode(prompt)
    assert id_to_token[ids[1]].startswith("Ġ")  # the template's leading space is a byte-level "Ġ"
    assert vocab.decode(ids) == prompt
    assert vocab.encode("the red") != vocab.encode(" the red")  # no silent prefix space
    for text in [
        "  two  spaces and héllo 😀 <s> literal ",
        ' which region does the text " red star " describe?',
    ]:
        assert vocab.decode(vocab.encode(text)) == text
    grounded = " what does the region describe? region: <bin_1> <bin_2> <bin_3> <bin_4>"
    ids = vocab.encode(grounded, add_bos=False, add_eos=False)
    assert ids[-4:] == [vocab.bin_id(i) for i in (1, 2, 3, 4)]
    assert vocab.decode(ids) == grounded
    infill = "the <mask> is red"
    ids = vocab.encode(infill, add_bos=False, add_eos=False)
    assert id_to_token[ids[ids.index(vocab.mask_id) + 1]] == "Ġis"  # word after a special keeps its space
    assert vocab.decode(ids) == infill


def test_gpt2_save_load_and_mask_appended(bart_files, tmp_path):
    vocab_json, merges_txt, _ = bart_files
    vocab = Vocab.from_gpt2_bpe(vocab_json, merges_txt, num_codes=K, num_bins=B)
    vocab.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "vocab.json").read_bytes() == vocab_json.read_bytes()
    loaded = Vocab.load(tmp_path / "ckpt")
    assert loaded.backend == "gpt2" and len(loaded) == len(vocab)
    text = " is the small <mask> red? <code_5>"
    assert loaded.encode(text) == vocab.encode(text)

    no_mask_json, no_mask_merges, raw = write_bart_files(tmp_path / "nomask", with_mask=False)
    appended = Vocab.from_gpt2_bpe(no_mask_json, no_mask_merges, num_codes=K, num_bins=B)
    assert appended.mask_id == len(raw) and appended.code_offset == len(raw) + 1


def test_gpt2_directory_without_our_config_loads_as_official_ofa(bart_files, tmp_path):
    vocab_json, merges_txt, raw = bart_files
    for f in (vocab_json, merges_txt):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "OFATokenizer"}')  # an HF one
    vocab = Vocab.load(tmp_path)
    assert (vocab.num_codes, vocab.num_bins, vocab.code_offset) == (8192, 1000, len(raw))
    vocab.save(tmp_path)  # adds our layout next to the foreign keys
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "OFATokenizer" and cfg["backend"] == "gpt2"


def test_gpt2_bad_vocab_names_the_file(bart_files, tmp_path):
    _, merges_txt, raw = bart_files
    swapped = dict(raw, **{"<s>": raw["<pad>"], "<pad>": raw["<s>"]})
    bad = tmp_path / "bad_vocab.json"
    bad.write_text(json.dumps(swapped))
    with pytest.raises(ValueError, match=r"bad_vocab\.json.*'<s>' at id 0"):
        Vocab.from_gpt2_bpe(bad, merges_txt)


# --- no tokenizer files -----------------------------------------------------------------------------


def test_without_text_raises_named_error_for_text_only(tmp_path):
    vocab = Vocab.without_text(subword_size=50264, num_codes=8192, num_bins=1000)
    assert not vocab.has_text
    with pytest.raises(TokenizerMissingError, match=r"spm\.model.*vocab\.json \+ merges\.txt") as err:
        vocab.encode(" what does the image describe?")
    assert isinstance(err.value, RuntimeError)
    with pytest.raises(TokenizerMissingError):
        vocab.decode([BOS, 100, EOS])
    ids = vocab.encode("<bin_1> <bin_2> <code_7> <mask>")
    assert ids == [BOS, 58458, 58459, 50272, 50264, EOS]
    assert vocab.decode(ids) == "<bin_1> <bin_2> <code_7> <mask>"
    vocab.save(tmp_path)
    loaded = Vocab.load(tmp_path)
    assert not loaded.has_text and len(loaded) == 59457 and loaded.mask_id == 50264
