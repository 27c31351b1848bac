"""Joint vocabulary: text subwords, `<mask>`, image codes and location bins in one id space.

OFA's order (design.md section 1), kept so an official OFA checkpoint is just another subword model:
ids 0-3 `<s>` (bos) `<pad>` `</s>` (eos) `<unk>`; the subwords; `<mask>`; `<code_0>`..`<code_{K-1}>`;
`<bin_0>`..`<bin_{B-1}>`. The text part is either a SentencePiece BPE trained here (the project's own
models) or GPT-2 byte-level BPE in BART's file format (official OFA checkpoints: BART's `vocab.json`
already holds fairseq's ids, so `<mask>` is 50264, `<code_0>` 50265, `<bin_0>` 58457, 59457 in all).
Boxes are `x0 y0 x1 y1` (x first, unlike systems that put y first), one bin token per coordinate.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import sentencepiece as spm
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

BOS, PAD, EOS, UNK = 0, 1, 2, 3
_SPECIAL_TOKENS = {BOS: "<s>", PAD: "<pad>", EOS: "</s>", UNK: "<unk>"}
# Literal special tokens a text may carry; they bypass the subword model and become single ids.
_SPECIAL_RE = re.compile(r"<mask>|<code_(\d+)>|<bin_(\d+)>")

CONFIG_FILE = "tokenizer_config.json"  # not vocab.json: that name belongs to GPT-2 BPE
SPM_FILE = "spm.model"
GPT2_VOCAB_FILE = "vocab.json"
GPT2_MERGES_FILE = "merges.txt"
_BACKEND_FILES = {"sentencepiece": (SPM_FILE,), "gpt2": (GPT2_VOCAB_FILE, GPT2_MERGES_FILE), "none": ()}
# Official OFA checkpoints (all sizes) use these; a directory with only BART files gets them.
OFA_NUM_CODES, OFA_NUM_BINS = 8192, 1000


class TokenizerMissingError(RuntimeError):
    """Text was to be encoded or decoded by a vocabulary built without tokenizer files."""


# ---------------------------------------------------------------------------------------------------
# Location bins


def _check_bins(size: float, num_bins: int) -> None:
    if not size > 0:
        raise ValueError(f"size must be > 0, got {size}")
    if num_bins < 2:
        raise ValueError(f"num_bins must be >= 2, got {num_bins}")


def quantize(v: float, size: float, num_bins: int) -> int:
    """Bin of coordinate `v` in `[0, size]`: round(v / size * (B-1)), clamped to [0, B-1].

    Python's round (half to even) matches torch.round, which OFA's preprocessing uses.
    """
    _check_bins(size, num_bins)
    if math.isnan(v):
        raise ValueError("cannot quantize NaN")
    x = min(max(v / size * (num_bins - 1), 0.0), float(num_bins - 1))  # clamp first: round(inf) fails
    return round(x)


def dequantize(b: int, size: float, num_bins: int) -> float:
    """Coordinate of bin `b`: b / (B-1) * size (the bin centre, so the error is at most half a bin)."""
    _check_bins(size, num_bins)
    if not 0 <= b < num_bins:
        raise ValueError(f"bin {b} out of range [0, {num_bins})")
    return b / (num_bins - 1) * size


# ---------------------------------------------------------------------------------------------------
# SentencePiece training


def train_sentencepiece(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int,
    *,
    character_coverage: float = 0.9995,
    normalization: str = "nmt_nfkc",
) -> Path:
    """Train the project's SentencePiece BPE on `texts` (one sentence each); writes `out_dir/spm.model`.

    SentencePiece's own ids are made to match the joint layout (bos 0, pad 1, eos 2, unk 3), so its
    pieces 4.. are our subword ids unchanged. Byte fallback means no text ever maps to `<unk>`.
    `vocab_size` counts those 4, the 256 byte pieces and the merges; on a corpus too small to fill it
    the model comes out smaller (hard_vocab_limit off). Literal `<mask>`/`<code_i>`/`<bin_i>` in the
    corpus are blanked out: encode() never hands them to SentencePiece, so pieces for them would be
    wasted. Same corpus and arguments give the same bytes (one thread, no sampling of sentences).
    `normalization` is a SentencePiece rule name (NFKC by default). SentencePiece also strips and
    collapses whitespace, so with this backend decode(encode(t)) is t with spaces normalized.
    """

    def sentences() -> Iterator[str]:
        for text in texts:
            text = _SPECIAL_RE.sub(" ", text).strip()
            if text:
                yield text

    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=buf,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,  # numbers tokenize digit by digit, the same way everywhere
            character_coverage=character_coverage,
            normalization_rule_name=normalization,
            bos_id=BOS,
            pad_id=PAD,
            eos_id=EOS,
            unk_id=UNK,
            hard_vocab_limit=False,
            input_sentence_size=0,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training failed (vocab_size={vocab_size}): {e}") from e
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / SPM_FILE
    path.write_bytes(buf.getvalue())
    return path


# ---------------------------------------------------------------------------------------------------
# Text backends: each maps text segments (no literal special tokens inside) to subword ids and back.


class _TextModel(Protocol):
    subword_size: int  # ids below the codes that are not <mask>: 4 specials + subwords
    mask_id: int | None  # set where the files themselves hold <mask>

    def encode(self, text: str, after_special: bool) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class _SentencePieceText:
    def __init__(self, model_proto: bytes, where: str) -> None:
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:
            raise ValueError(f"{where}: not a valid SentencePiece model ({e})") from e
        got = (self.sp.bos_id(), self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id())
        if got != (BOS, PAD, EOS, UNK):
            raise ValueError(
                f"{where}: SentencePiece bos/pad/eos/unk ids are {got}, the joint layout needs "
                f"{(BOS, PAD, EOS, UNK)}; train it with train_sentencepiece()"
            )
        self.subword_size = self.sp.get_piece_size()
        self.mask_id = None

    def encode(self, text: str, after_special: bool) -> list[int]:
        # SentencePiece adds its own word-start marker, so the space after a special token is implied.
        return self.sp.encode(text, out_type=int)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class _ByteLevelBPEText:
    def __init__(self, vocab_bytes: bytes, merges_bytes: bytes, vocab_where: str, merges_where: str) -> None:
        try:
            vocab = json.loads(vocab_bytes.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{vocab_where}: not a valid JSON vocabulary ({e})") from e
        if not (
            isinstance(vocab, dict) and vocab and all(isinstance(i, int) and i >= 0 for i in vocab.values())
        ):
            raise ValueError(f"{vocab_where}: expected a JSON object mapping tokens to ids >= 0")
        if len(set(vocab.values())) != len(vocab):
            raise ValueError(f"{vocab_where}: two tokens share an id")
        for sid, tok in _SPECIAL_TOKENS.items():
            if vocab.get(tok) != sid:
                raise ValueError(
                    f"{vocab_where}: expected {tok!r} at id {sid} (BART/fairseq order), "
                    f"found {vocab.get(tok)}"
                )
        merges = []
        try:
            lines = merges_bytes.decode("utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"{merges_where}: not UTF-8 text ({e})") from e
        for n, line in enumerate(lines, 1):
            if not line or (n == 1 and line.startswith("#version")):
                continue
            pair = line.split(" ")
            if len(pair) != 2:
                raise ValueError(
                    f"{merges_where} line {n}: expected two tokens separated by a space: {line!r}"
                )
            merges.append((pair[0], pair[1]))
        try:
            self.tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
        except Exception as e:  # tokenizers raises a bare Exception
            raise ValueError(f"{vocab_where} / {merges_where}: {e}") from e
        # Byte-level, no prefix space: OFA's templates start with " " themselves and it must survive.
        self.tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.tok.decoder = decoders.ByteLevel()
        self.mask_id = vocab.get("<mask>")
        top = max(vocab.values())
        self.subword_size = top if self.mask_id is not None else top + 1

    def encode(self, text: str, after_special: bool) -> list[int]:
        # GPT-2 words carry their leading space ("Ġis"), as in OFA's "<mask> is red".
        if after_special:
            text = " " + text
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


def _read(path: Path, backend: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        need = " + ".join(_BACKEND_FILES[backend])
        raise FileNotFoundError(f"{path}: missing; a {backend} vocabulary needs {need}") from None


# ---------------------------------------------------------------------------------------------------
# The joint vocabulary


class Vocab:
    """Joint id space; build with from_sentencepiece / from_gpt2_bpe / without_text / load."""

    bos_id, pad_id, eos_id, unk_id = BOS, PAD, EOS, UNK

    def __init__(
        self,
        backend: str,
        files: dict[str, bytes],
        num_codes: int,
        num_bins: int,
        subword_size: int | None = None,
        paths: dict[str, str] | None = None,
    ) -> None:
        """Low-level: `files` maps backend file names to their bytes, `paths` names them in errors.

        `subword_size` is given for backend "none" only; otherwise the files determine it.
        """
        if backend not in _BACKEND_FILES:
            raise ValueError(
                f"unknown vocabulary backend {backend!r}; expected one of {sorted(_BACKEND_FILES)}"
            )
        if num_codes < 0 or num_bins < 0:
            raise ValueError(f"num_codes and num_bins must be >= 0, got {num_codes}, {num_bins}")
        if (subword_size is None) != (backend != "none"):
            raise ValueError(
                "subword_size is given exactly when there are no tokenizer files (backend 'none')"
            )
        name = {n: (paths or {}).get(n, n) for n in _BACKEND_FILES[backend]}
        self.backend = backend
        self._files = dict(files)
        self._text: _TextModel | None = None
        if backend == "sentencepiece":
            self._text = _SentencePieceText(files[SPM_FILE], name[SPM_FILE])
        elif backend == "gpt2":
            self._text = _ByteLevelBPEText(
                files[GPT2_VOCAB_FILE], files[GPT2_MERGES_FILE], name[GPT2_VOCAB_FILE], name[GPT2_MERGES_FILE]
            )
        self.subword_size: int = self._text.subword_size if self._text is not None else int(subword_size or 0)
        if self.subword_size <= UNK:
            raise ValueError(
                f"subword_size counts the 4 specials, so must be > {UNK}, got {self.subword_size}"
            )
        file_mask = self._text.mask_id if self._text is not None else None
        self.mask_id: int = file_mask if file_mask is not None else self.subword_size
        self.code_offset = self.subword_size + 1
        self.num_codes = num_codes
        self.bin_offset = self.code_offset + num_codes
        self.num_bins = num_bins

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_sentencepiece(cls, model_file: str | Path, num_codes: int, num_bins: int) -> Vocab:
        """The project's own vocabulary from a model written by train_sentencepiece()."""
        files = {SPM_FILE: _read(Path(model_file), "sentencepiece")}
        return cls("sentencepiece", files, num_codes, num_bins, paths={SPM_FILE: str(model_file)})

    @classmethod
    def from_gpt2_bpe(
        cls,
        vocab_json: str | Path,
        merges_txt: str | Path,
        num_codes: int = OFA_NUM_CODES,
        num_bins: int = OFA_NUM_BINS,
    ) -> Vocab:
        """Official OFA vocabulary from BART's `vocab.json` + `merges.txt` (ids kept exactly).

        `<mask>` keeps its id from vocab.json; if the file has none it is appended after the subwords.
        """
        files = {
            GPT2_VOCAB_FILE: _read(Path(vocab_json), "gpt2"),
            GPT2_MERGES_FILE: _read(Path(merges_txt), "gpt2"),
        }
        paths = {GPT2_VOCAB_FILE: str(vocab_json), GPT2_MERGES_FILE: str(merges_txt)}
        return cls("gpt2", files, num_codes, num_bins, paths=paths)

    @classmethod
    def without_text(cls, subword_size: int, num_codes: int, num_bins: int) -> Vocab:
        """Layout only, for checkpoints that ship no tokenizer files.

        `subword_size` counts ids 0..subword_size-1 (4 specials + subwords; 50264 for OFA), so `<mask>`
        is `subword_size`. Ids, codes, bins and boxes work; encoding or decoding text raises
        TokenizerMissingError.
        """
        return cls("none", {}, num_codes, num_bins, subword_size=subword_size)

    # -- persistence -------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write the backend files and `tokenizer_config.json` (the layout) into `directory`.

        Keys already in a foreign tokenizer_config.json (an HF checkpoint's) are kept.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for name, data in self._files.items():
            (out / name).write_bytes(data)
        cfg_path = out / CONFIG_FILE
        cfg: dict = {}
        if cfg_path.is_file():
            try:
                existing = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                existing = None
            if isinstance(existing, dict):
                cfg = existing
        cfg.update(self._layout())
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")

    def _layout(self) -> dict:
        return {
            "backend": self.backend,
            "subword_size": self.subword_size,
            "mask_id": self.mask_id,
            "num_codes": self.num_codes,
            "num_bins": self.num_bins,
            "vocab_size": len(self),
        }

    @classmethod
    def load(cls, directory: str | Path) -> Vocab:
        """Read a directory written by save().

        A directory with BART `vocab.json` + `merges.txt` and no layout of ours (an official HF OFA
        checkpoint) loads as OFA's vocabulary (8192 codes, 1000 bins).
        """
        d = Path(directory)
        cfg_path = d / CONFIG_FILE
        cfg = None
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e
            if not isinstance(cfg, dict):
                raise ValueError(f"{cfg_path}: expected a JSON object")
            if "backend" not in cfg:
                cfg = None  # someone else's tokenizer_config.json (HF); infer from the files below
        if cfg is None:
            if (d / GPT2_VOCAB_FILE).is_file() and (d / GPT2_MERGES_FILE).is_file():
                return cls.from_gpt2_bpe(d / GPT2_VOCAB_FILE, d / GPT2_MERGES_FILE)
            raise FileNotFoundError(
                f"{cfg_path}: missing (or without a 'backend' key); save a Vocab there, or add BART "
                f"{GPT2_VOCAB_FILE} + {GPT2_MERGES_FILE} for an official OFA checkpoint"
            )
        try:
            backend = cfg["backend"]
            num_codes, num_bins = int(cfg["num_codes"]), int(cfg["num_bins"])
            subword_size = int(cfg["subword_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{cfg_path}: missing or bad key {e}") from e
        if backend not in _BACKEND_FILES:
            raise ValueError(
                f"{cfg_path}: unknown backend {backend!r}; expected one of {sorted(_BACKEND_FILES)}"
            )
        files = {name: _read(d / name, backend) for name in _BACKEND_FILES[backend]}
        paths = {name: str(d / name) for name in files}
        vocab = cls(backend, files, num_codes, num_bins, subword_size if backend == "none" else None, paths)
        want = {k: cfg[k] for k in ("subword_size", "mask_id", "vocab_size") if k in cfg}
        got = {k: v for k, v in vocab._layout().items() if k in want}
        if got != want:
            names = " + ".join(_BACKEND_FILES[backend])
            raise ValueError(
                f"{cfg_path} records {want} but {names} in {d} give {got}; the files do not match"
            )
        return vocab

    def __reduce__(self) -> tuple:
        # Rebuild from the file bytes: tokenizer objects need not pickle (DataLoader workers, spawn).
        sub = self.subword_size if self._text is None else None
        return (type(self), (self.backend, self._files, self.num_codes, self.num_bins, sub))

    # -- layout ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.bin_offset + self.num_bins

    def __repr__(self) -> str:
        return (
            f"Vocab(backend={self.backend!r}, size={len(self)}, mask_id={self.mask_id}, "
            f"codes={self.num_codes}@{self.code_offset}, bins={self.num_bins}@{self.bin_offset})"
        )

    @property
    def has_text(self) -> bool:
        """False for without_text() vocabularies."""
        return self._text is not None

    def code_id(self, i: int) -> int:
        if not 0 <= i < self.num_codes:
            raise ValueError(f"code index {i} out of range [0, {self.num_codes})")
        return self.code_offset + i

    def bin_id(self, i: int) -> int:
        if not 0 <= i < self.num_bins:
            raise ValueError(f"bin index {i} out of range [0, {self.num_bins})")
        return self.bin_offset + i

    def is_code(self, token_id: int) -> bool:
        return self.code_offset <= token_id < self.bin_offset

    def is_bin(self, token_id: int) -> bool:
        return self.bin_offset <= token_id < len(self)

    def _is_subword(self, token_id: int) -> bool:
        return UNK < token_id < self.code_offset and token_id != self.mask_id

    def _special_string(self, token_id: int) -> str:
        if token_id in _SPECIAL_TOKENS:
            return _SPECIAL_TOKENS[token_id]
        if token_id == self.mask_id:
            return "<mask>"
        if self.is_code(token_id):
            return f"<code_{token_id - self.code_offset}>"
        return f"<bin_{token_id - self.bin_offset}>"

    # -- text --------------------------------------------------------------------------------------

    def _require_text(self) -> _TextModel:
        if self._text is None:
            raise TokenizerMissingError(
                "this vocabulary has no text tokenizer (the checkpoint ships no tokenizer files): add "
                f"{SPM_FILE} (SentencePiece) or {GPT2_VOCAB_FILE} + {GPT2_MERGES_FILE} "
                "(GPT-2 BPE, BART format) to the checkpoint directory"
            )
        return self._text

    def _literal_id(self, m: re.Match) -> int:
        if m.group(1) is not None:
            i, n, kind, offset = int(m.group(1)), self.num_codes, "code", self.code_offset
        elif m.group(2) is not None:
            i, n, kind, offset = int(m.group(2)), self.num_bins, "bin", self.bin_offset
        else:
            return self.mask_id
        if i >= n:
            have = f"<{kind}_0>..<{kind}_{n - 1}>" if n else f"no {kind} tokens"
            raise ValueError(f"{m.group(0)} is out of range: this vocabulary has {have}")
        return offset + i

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Ids of `text`; literal `<mask>`, `<code_i>`, `<bin_i>` inside it become those single ids.

        Whitespace next to a literal special token only separates it from the words; decode() puts a
        single space back.
        """
        ids = [BOS] if add_bos else []
        pos, after_special = 0, False
        for m in _SPECIAL_RE.finditer(text):
            self._encode_segment(text[pos : m.start()], after_special, True, ids)
            ids.append(self._literal_id(m))
            pos, after_special = m.end(), True
        self._encode_segment(text[pos:], after_special, False, ids)
        if add_eos:
            ids.append(EOS)
        return ids

    def _encode_segment(self, text: str, after_special: bool, before_special: bool, out: list[int]) -> None:
        if after_special:
            text = text.lstrip()
        if before_special:
            text = text.rstrip()
        if text:
            out.extend(self._require_text().encode(text, after_special))

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids`; `<mask>`, codes, bins (and `<unk>`) rendered as `<mask>`, `<code_i>`, `<bin_i>`.

        skip_special drops bos, eos and pad; otherwise they show as `<s>`, `</s>`, `<pad>`.
        """
        parts: list[str] = []
        run: list[int] = []
        for token in ids:
            t = int(token)
            if not 0 <= t < len(self):
                raise ValueError(f"token id {t} out of range [0, {len(self)})")
            if skip_special and t in (BOS, PAD, EOS):
                continue
            if self._is_subword(t):
                run.append(t)
                continue
            if run:
                parts.append(self._require_text().decode(run))
                run = []
            parts.append(self._special_string(t))
        if run:
            parts.append(self._require_text().decode(run))
        # Adjacent parts are never both subword runs, so each boundary touches a special token.
        text = ""
        for part in parts:
            if text and part and not text[-1].isspace() and not part[0].isspace():
                text += " "
            text += part
        return text

    # -- boxes -------------------------------------------------------------------------------------

    def box_to_tokens(self, box: Sequence[float], width: float, height: float) -> list[int]:
        """Four bin ids for a pixel box `[x0, y0, x1, y1]` (x scaled by width, y by height)."""
        if len(box) != 4:
            raise ValueError(f"a box is [x0, y0, x1, y1], got {len(box)} values")
        x0, y0, x1, y1 = box
        sizes = (width, height, width, height)
        return [
            self.bin_id(quantize(v, s, self.num_bins)) for v, s in zip((x0, y0, x1, y1), sizes, strict=True)
        ]

    def tokens_to_box(self, ids: Sequence[int], width: float, height: float) -> list[float]:
        """Pixel box `[x0, y0, x1, y1]` from four bin ids; ValueError if they are not four bins."""
        ids = [int(i) for i in ids]
        if len(ids) != 4 or not all(self.is_bin(i) for i in ids):
            raise ValueError(f"a box is 4 bin ids in [{self.bin_offset}, {len(self)}), got {ids}")
        sizes = (width, height, width, height)
        return [dequantize(i - self.bin_offset, s, self.num_bins) for i, s in zip(ids, sizes, strict=True)]


# ---------------------------------------------------------------------------------------------------
# CLI (wired by the lead as `python -m ofa_unified vocab ...`)


def cli_train(argv: list[str] | None = None) -> None:
    """Train the project's SentencePiece BPE on text files and save a Vocab directory."""
    p = argparse.ArgumentParser(
        prog="ofa-unified vocab",
        description="Train the project's SentencePiece BPE and save a joint vocabulary directory "
        f"({SPM_FILE} + {CONFIG_FILE}).",
    )
    p.add_argument(
        "--input", nargs="+", required=True, type=Path, metavar="FILE", help="one sentence per line"
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=8000,
        help="SentencePiece size incl. 4 specials and 256 byte pieces; small corpora give fewer",
    )
    p.add_argument("--num-codes", type=int, default=OFA_NUM_CODES, help="image codes (the VQ codebook size)")
    p.add_argument("--num-bins", type=int, default=OFA_NUM_BINS, help="location bins")
    args = p.parse_args(argv)
    missing = [str(f) for f in args.input if not f.is_file()]
    if missing:
        p.error(f"input file(s) not found: {', '.join(missing)}")

    def lines() -> Iterator[str]:
        for f in args.input:
            with f.open(encoding="utf-8") as fh:
                yield from fh

    model = train_sentencepiece(lines(), args.out, args.vocab_size)
    vocab = Vocab.from_sentencepiece(model, args.num_codes, args.num_bins)
    vocab.save(args.out)
    print(f"saved {vocab!r} to {args.out}")
