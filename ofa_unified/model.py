"""The OFA encoder-decoder, readable top to bottom.

One Transformer reads image patches (ResNet features) followed by instruction tokens and writes
tokens of the joint vocabulary. What makes it OFA rather than a plain seq2seq model:

* positions are not added to the tokens; they enter every attention layer as a bias
  `(pos_q * s) @ pos_k^T` computed once per forward (TUPE-style decoupled positions),
  with a per-layer learned relative bias on top (1D for text, 2D for image patches/codes);
* NormFormer extras: per-head scale `c_attn` and a LayerNorm after each attention and on the
  FFN hidden; attention scale `(head_dim * 2) ** -0.5`;
* the decoder treats image-code outputs (`code_mask`) with 2D image positions.

Not in OFA, each off by default (see OFAConfig): `image_skip`, `image_pos_content`, `image_tokens`
on the input side, `image_expert`, a BEiT-3-style multiway split on the output modality,
`modality_experts` (VLMo's split on the input modality) and `itc_dim`, a retrieval head (`embed`).
OFA's own pieces can each be removed (`abs_pos_bias`, `cross_pos_bias`, `normformer`,
`patch_layernorm`, `attention_scale`; OFA_SETTINGS): with them a small model is slow to read the
image (the binding ladder, bench/README.md).

Parameter names follow OFA's HF port, so official weights load with renames only
(see `checkpoint.py`). `encode` runs once; `decode` is incremental over a `KVCache` so the
decoding loops in `generate.py` cost one token per step.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ofa_unified.resnet import RESNET_LAYERS, ResNet, drop_path, linspace

PAD_ID = 1
# OFAConfig options that OFA's architecture lacks -> what their parameter names contain (HF export
# refuses them; fine-tuning a checkpoint with one turned on starts its module at zero, except the
# image expert's FFNs, which start as copies of the shared ones).
EXPERT = "image_ffn."  # an image expert's FFN sits at `<layer>.image_ffn.<OFA's FFN names>`
VISION_EXPERT, VL_EXPERT = "vision_ffn.", "vl_ffn."  # modality experts, beside the layer's own FFN
FFN_EXPERTS = (EXPERT, VISION_EXPERT, VL_EXPERT)  # each starts as a copy of its layer's own FFN
ITC_HEAD = "itc_"  # the retrieval head: keeps its fresh init (a zero projection has no gradient)
NON_OFA_MODULES = {
    "image_skip": "encoder.image_skip_proj.",
    "image_pos_content": "encoder.image_pos_proj.",
    "image_tokens": "encoder.image_code_proj.",
    "image_expert": f".{EXPERT}",
    "modality_experts": f".{VISION_EXPERT}",
    "fusion_layers": f".{VL_EXPERT}",
    "itc_dim": ITC_HEAD,
}
# Parameters that only image-output rows (`code_mask`) use when `image_expert` is on: training only
# these (train/configs/shapes_image_expert.py) cannot change any text task's output.
IMAGE_OUTPUT_PARAMS = (
    re.escape(f".{EXPERT}") + r"|^encoder\.image_code_proj\."
    r"|^decoder\.(code_layernorm_embedding|image_pos_ln|embed_image_positions|image_rel_pos_table_list)\."
)
# OFAConfig fields that remove a piece of OFA -> OFA's own setting (the HF export refuses the others).
OFA_SETTINGS = {
    "abs_pos_bias": True,
    "cross_pos_bias": True,
    "normformer": True,
    "patch_layernorm": True,
    "attention_scale": "ofa",
}
CONFIG_DIR = Path(__file__).parent / "model_configs"


@dataclass
class OFAConfig:
    """Architecture of one model. Named sizes live in `model_configs/*.json`."""

    vocab_size: int = 59457
    d_model: int = 256
    encoder_layers: int = 4
    decoder_layers: int = 4
    encoder_heads: int = 4
    decoder_heads: int = 4
    encoder_ffn_dim: int = 1024
    decoder_ffn_dim: int = 1024
    resnet_layers: tuple[int, int, int] = RESNET_LAYERS["resnet50"]
    resnet_width: int = 64
    max_positions: int = 1024
    token_bucket_size: int = 256
    image_bucket_size: int = 42
    # Width of the code grid the decoder writes for image outputs (OFA: code_image_size // 8).
    code_grid_size: int = 16
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    encoder_drop_path_rate: float = 0.0
    decoder_drop_path_rate: float = 0.0
    resnet_drop_path_rate: float = 0.0
    # Not in OFA: add the ResNet's stage-1 features, average-pooled to the patch grid, to each patch
    # embedding. Colour is linearly readable there but a small stem trained on shape-heavy tasks can
    # lose it by stage 3 (bench/README.md, "What the image stem keeps").
    image_skip: bool = False
    # Not in OFA (BEiT/ViT do it): add each patch's position embedding to its content as well as to
    # the attention bias, so text (box bins, "on the left") can address patches by place.
    image_pos_content: bool = False
    # Not in OFA (BEiT-3: images as tokens on the input side too): add to each patch the embeddings of
    # the VQ codes it covers (the shared token embedding, averaged onto the patch grid). The tokenizer
    # keeps colour and texture (31 dB) that a stem trained on these tasks drops; callers pass the code
    # grid as `image_codes` (`vq.encoder_codes`).
    image_tokens: bool = False
    # Not in OFA (BEiT-3/VLMo's multiway experts, split by what the decoder writes): rows whose output
    # is image codes (`code_mask`) run their own copy of every encoder and decoder FFN, and only they
    # read the `image_tokens` term; text outputs run the shared weights alone. Attention, embeddings
    # and the stem stay shared. So the image tasks can be trained on without moving any text task.
    image_expert: bool = False
    # Not in OFA (VLMo's MoME, BEiT-3's Multiway): every encoder layer keeps one shared attention but
    # routes each token's FFN by input modality: patches to a vision expert (`vision_ffn`), text to the
    # layer's own FFN (the language expert, OFA's names, so a text-only input computes what a model
    # without the option does). In the top `fusion_layers` a vision-language expert (`vl_ffn`) serves
    # every token of an input with both image and text; image-only and text-only inputs use only their
    # own expert in every layer, which makes the encoder a dual encoder too (`embed`). Composes with
    # `image_expert`: image-output rows run the image expert at every position, as without this option.
    modality_experts: bool = False
    fusion_layers: int = 0
    # Not in OFA (VLMo/CLIP's image-text contrastive head): width of the retrieval embeddings that
    # `OFAModel.embed` gives for an image alone or a text alone; 0 = no retrieval head.
    itc_dim: int = 0
    # OFA's own pieces, each removable (the binding ladder, bench/README.md: with all four at OFA's
    # setting a micro model does not learn a one-object colour question in 150 steps; without them it
    # passes a plain nn.Transformer). True / "ofa" is OFA's computation, exactly.
    abs_pos_bias: bool = True  # False: no decoupled absolute position bias; relative tables only
    # False: the decoder's cross-attention gets no absolute position bias, so its content alone picks
    # the patches it reads (OFA's bias there fixes each decoder step's patches before any is read)
    cross_pos_bias: bool = True
    normformer: bool = True  # False: no LayerNorm after attention nor on the FFN hidden
    patch_layernorm: bool = True  # False: patch embeddings enter the encoder unnormalised
    attention_scale: str = "ofa"  # "ofa": (2 * head_dim) ** -0.5; "head_dim": head_dim ** -0.5
    # Preprocessing and decoding conventions that travel with the weights.
    patch_image_size: int = 480
    prompt_type: str = "none"  # "prev_output": source minus eos is forced as decoder prefix (OFA fine-tuned)
    # True: verdicts (ITM, yes / no questions) are written after the evidence that settles them
    # (" small circles: blue answer: no"), and decoding lets the model write it before the candidate
    # trie. A bare yes / no is a comparison with no first-order signal, which neither this model nor
    # a plain Transformer learns (bench/README.md, "Verifying a caption").
    answer_evidence: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.resnet_layers = tuple(self.resnet_layers)
        for name in ("d_model", "encoder_layers", "decoder_layers", "vocab_size", "resnet_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"OFAConfig.{name} must be >= 1, got {getattr(self, name)}")
        for side in ("encoder", "decoder"):
            heads = getattr(self, f"{side}_heads")
            if self.d_model % heads:
                raise ValueError(f"d_model {self.d_model} is not divisible by {side}_heads {heads}")
        if len(self.resnet_layers) != 3:
            raise ValueError(f"resnet_layers needs 3 stage depths, got {self.resnet_layers}")
        if self.attention_scale not in ("ofa", "head_dim"):
            raise ValueError(f"attention_scale must be 'ofa' or 'head_dim', got {self.attention_scale!r}")
        if self.prompt_type not in ("none", "prev_output"):
            raise ValueError(f"prompt_type must be 'none' or 'prev_output', got {self.prompt_type!r}")
        if not 0 <= self.fusion_layers <= self.encoder_layers:
            raise ValueError(
                f"fusion_layers must be in [0, {self.encoder_layers}] (the encoder's layers), "
                f"got {self.fusion_layers}"
            )
        if self.fusion_layers and not self.modality_experts:
            raise ValueError("fusion_layers > 0 needs modality_experts=True (its VL expert is one of them)")
        if self.itc_dim < 0:
            raise ValueError(f"itc_dim must be >= 0 (0: no retrieval head), got {self.itc_dim}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["resnet_layers"] = list(self.resnet_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> OFAConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown OFAConfig fields: {unknown}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# Relative position buckets (deterministic index tables, recomputed rather than stored)


@lru_cache(maxsize=4)
def token_bucket_positions(bucket_size: int, max_position: int) -> torch.Tensor:
    """[max_position, max_position] bucket ids: exact within +-bucket/2, log-spaced beyond."""
    pos = torch.arange(max_position, device="cpu")
    rel = pos[:, None] - pos[None, :]
    sign = torch.sign(rel)
    mid = bucket_size // 2
    abs_pos = torch.where((rel < mid) & (rel > -mid), mid - 1, rel.abs())
    log_pos = torch.ceil(torch.log(abs_pos / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid
    bucket = torch.where(abs_pos <= mid, rel, log_pos.int() * sign).long()
    return bucket + bucket_size - 1


@lru_cache(maxsize=4)
def image_bucket_positions(bucket_size: int) -> torch.Tensor:
    """[n*n+1, n*n+1] ids of 2D offsets between grid cells; row/col 0 is a special (cls) slot."""
    num_rel = (2 * bucket_size - 1) ** 2 + 3
    axis = torch.arange(bucket_size, device="cpu")
    coords = torch.stack(torch.meshgrid(axis, axis, indexing="ij"))
    coords = coords.flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + bucket_size - 1
    index = torch.zeros((bucket_size * bucket_size + 1,) * 2, dtype=torch.long, device="cpu")
    index[1:, 1:] = rel[:, :, 0] * (2 * bucket_size - 1) + rel[:, :, 1]
    index[0, :] = num_rel - 3
    index[:, 0] = num_rel - 2
    index[0, 0] = num_rel - 1
    return index


def image_position_ids(height: int, width: int, bucket_size: int) -> torch.Tensor:
    """Flattened 2D position ids `row * bucket + col + 1` of an h x w grid."""
    return (torch.arange(height)[:, None] * bucket_size + torch.arange(width)[None, :] + 1).flatten()


def decoder_code_positions(grid: int, bucket_size: int) -> torch.Tensor:
    """Image position ids for decoder steps when the output is a code grid (bos gets 0)."""
    ids = image_position_ids(grid, grid, bucket_size)
    return torch.cat([torch.zeros(1, dtype=torch.long), ids, torch.full((768,), 1024)])


# ---------------------------------------------------------------------------------------------
# Encoder output and decoder cache


@dataclass
class EncoderOutput:
    hidden: torch.Tensor  # [B, S, d] after the final LayerNorm
    padding_mask: torch.Tensor  # [B, S] True where padded
    pos_embed: torch.Tensor  # [B, S, d] normalised absolute positions, for the cross-attention bias
    code_mask: torch.Tensor | None = None  # [B] True: this sample's decoder writes image codes

    def index_select(self, idx: torch.Tensor) -> EncoderOutput:
        pick = lambda t: None if t is None else t.index_select(0, idx)
        return EncoderOutput(
            pick(self.hidden), pick(self.padding_mask), pick(self.pos_embed), pick(self.code_mask)
        )

    def repeat_interleave(self, n: int) -> EncoderOutput:
        idx = torch.arange(self.hidden.size(0), device=self.hidden.device).repeat_interleave(n)
        return self.index_select(idx)

    @staticmethod
    def concat(outputs: Sequence[EncoderOutput]) -> EncoderOutput:
        """The rows of several outputs as one batch (a step-wise batch takes in new requests):
        shorter sources are padded to the longest, their padding masked (zeros elsewhere, so that a
        masked position is finite)."""
        width = max(o.hidden.size(1) for o in outputs)
        codes = [o.code_mask for o in outputs]
        code_mask = None
        if any(c is not None for c in codes):
            code_mask = torch.cat(
                [
                    o.hidden.new_zeros(len(o.hidden), dtype=torch.bool) if c is None else c
                    for o, c in zip(outputs, codes, strict=True)
                ]
            )
        return EncoderOutput(
            cat_padded([o.hidden for o in outputs], 1, width),
            cat_padded([o.padding_mask for o in outputs], 1, width, True),
            cat_padded([o.pos_embed for o in outputs], 1, width),
            code_mask,
        )


def cat_padded(parts: Sequence[torch.Tensor], dim: int, width: int, value: float | bool = 0) -> torch.Tensor:
    """`parts` concatenated along dim 0, each padded with `value` along `dim` to `width`, in one copy
    (a step-wise batch joins its rows to new ones at every admission)."""
    first = parts[0]
    shape = [sum(p.size(0) for p in parts), *first.shape[1:]]
    shape[dim] = width
    out = first.new_full(shape, value)
    row = 0
    for p in parts:
        out[row : row + p.size(0)].narrow(dim, 0, p.size(dim)).copy_(p)
        row += p.size(0)
    return out


@dataclass
class KVCache:
    """What one request's decoding keeps between steps. Self-attention keys/values live in
    preallocated [B, H, capacity, d] buffers (the first `length` positions valid; a step writes its
    slice instead of concatenating). What depends on the encoder output alone is computed once for
    `source`, the EncoderOutput it was made from: the cross-attention keys/values and the keys of
    the cross-attention position bias. `reorder` moves the self-attention rows at once and the
    encoder-side rows lazily: if the next step passes `source` itself (beams reordered within their
    samples, whose encoder rows are copies), nothing moves; a new encoder output (samples that
    finished dropped out) gathers them then.

    Rows of a step-wise batch (`concat`) sit at different positions: `lengths` holds each row's
    valid positions (left-aligned in the buffers, `length` their maximum; None while all rows have
    `length`), and such a cache takes one token per row and step. Buffers start zeroed, so the
    unused slots a shorter row's attention masks out are finite."""

    self_kv: list[tuple[torch.Tensor, torch.Tensor]]
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]]
    length: int = 0
    source: EncoderOutput | None = None
    cross_pos_k: torch.Tensor | None = None  # [B, H, hd, S] (or broadcastable), scaled as it is used
    pending: torch.Tensor | None = None  # rows of `source` for the current rows, if reordered since
    lengths: torch.Tensor | None = None  # [B] valid positions per row, where rows differ

    def reorder(self, idx: torch.Tensor) -> KVCache:
        # The valid positions and room for 32 more move, not the whole capacity (a batch's rows share
        # its longest row's: a step-wise batch's short rows would copy a long one's buffer).
        room = self.length + 32
        self.self_kv = [
            (k[:, :, :room].index_select(0, idx), v[:, :, :room].index_select(0, idx))
            for k, v in self.self_kv
        ]
        self.pending = idx if self.pending is None else self.pending[idx]
        if self.lengths is not None:
            self._set_lengths(self.lengths[idx])
        return self

    def _set_lengths(self, lengths: torch.Tensor) -> None:
        """Per-row lengths; back to one shared `length` (the plain decoder path) once they agree."""
        longest = int(lengths.max())
        self.length = longest
        self.lengths = None if bool((lengths == longest).all()) else lengths

    @staticmethod
    def concat(caches: Sequence[KVCache], source: EncoderOutput) -> KVCache:
        """The rows of several caches as one, for `source` (the `EncoderOutput.concat` of theirs,
        which each cache must be current for: no pending reorder). Self-attention positions are
        copied left-aligned into new buffers and the encoder side is padded to `source`'s width."""
        if any(c.pending is not None for c in caches):
            raise ValueError("KVCache.concat needs caches without a pending reorder")
        width, longest = source.hidden.size(1), max(c.length for c in caches)
        self_kv = [
            tuple(
                cat_padded([c.self_kv[layer][i][:, :, : c.length] for c in caches], 2, longest + 32)
                for i in range(2)
            )
            for layer in range(len(caches[0].self_kv))
        ]
        cross_kv = [
            tuple(cat_padded([c.cross_kv[layer][i] for c in caches], 2, width) for i in range(2))
            for layer in range(len(caches[0].cross_kv))
        ]
        pos_k = [c.cross_pos_k for c in caches]
        cross_pos_k = None if any(k is None for k in pos_k) else cat_padded(pos_k, 3, width)
        lengths = torch.cat(
            [
                c.lengths
                if c.lengths is not None
                else torch.full((c.self_kv[0][0].size(0),), c.length, device=source.hidden.device)
                for c in caches
            ]
        )
        out = KVCache(self_kv, cross_kv, longest, source, cross_pos_k)  # type: ignore[arg-type]
        out._set_lengths(lengths)
        return out

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one layer's new keys/values [B, H, T, d] after the cached `length` positions (each
        row's own `lengths`, T = 1, where rows differ; the caller advances them once per step) and
        return views of all valid positions."""
        end = self.length + k.size(2)
        if layer == len(self.self_kv):  # first call: room for this call and 32 more positions
            shape = (*k.shape[:2], end + 32, k.size(3))
            self.self_kv.append((k.new_zeros(shape), v.new_zeros(shape)))
        buf_k, buf_v = self.self_kv[layer]
        if end > buf_k.size(2):  # full: double the capacity (amortised O(1) per step)
            grown = [b.new_zeros((*b.shape[:2], 2 * end, b.size(3))) for b in (buf_k, buf_v)]
            for new, old in zip(grown, (buf_k, buf_v), strict=True):
                new[:, :, : self.length] = old[:, :, : self.length]
            buf_k, buf_v = grown
            self.self_kv[layer] = (buf_k, buf_v)
        if self.lengths is not None:
            rows = torch.arange(k.size(0), device=k.device)
            buf_k[rows, :, self.lengths] = k[:, :, 0]
            buf_v[rows, :, self.lengths] = v[:, :, 0]
        else:
            buf_k[:, :, self.length : end] = k
            buf_v[:, :, self.length : end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def for_source(self, enc: EncoderOutput) -> bool:
        """Make the encoder-side entries match `enc`'s rows; False if there are none yet (a new
        request, or an encoder output that is no reordering of `source`: recompute them)."""
        if self.source is enc:
            self.pending = None
            return bool(self.cross_kv)
        if self.pending is None or not self.cross_kv:
            return False
        idx = self.pending
        self.cross_kv = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in self.cross_kv]
        self.source, self.pending, self.cross_pos_k = enc, None, None
        return True


# ---------------------------------------------------------------------------------------------
# Layers


class Attention(nn.Module):
    """Multi-head attention with NormFormer head scaling; positions arrive as an additive bias."""

    def __init__(self, d_model: int, heads: int, dropout: float, scale: str = "ofa"):
        super().__init__()
        self.heads, self.head_dim = heads, d_model // heads
        self.scaling = (self.head_dim * (2 if scale == "ofa" else 1)) ** -0.5
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.c_attn = nn.Parameter(torch.ones(heads))

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), x.size(1), self.heads, self.head_dim).transpose(1, 2)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.k_proj(x)), self.split(self.v_proj(x))

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        q = self.split(self.q_proj(x))
        k, v = kv
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0, scale=self.scaling
        )
        out = out * self.c_attn.view(1, -1, 1, 1)
        return self.out_proj(out.transpose(1, 2).reshape(x.shape))


def select_rows(mask: torch.Tensor | None) -> torch.Tensor | bool:
    """The rows a [B] mask selects, resolved once per forward (each check syncs a GPU): False for
    none, True for all, else the mask itself."""
    if mask is None or not bool(mask.any()):
        return False
    return True if bool(mask.all()) else mask


def code_rows(code_mask: torch.Tensor | None) -> torch.Tensor | bool:
    """Which rows write image codes (`select_rows` of the code mask)."""
    return select_rows(code_mask)


# An encoder layer's FFN routing under `modality_experts`: (rows, positions, expert) parts that
# cover the batch once; the expert is an attribute of the layer (`vision_ffn`, ...), None its own FFN.
Route = list[tuple[torch.Tensor | slice, slice, str | None]]


def norm(d: int, on: bool) -> nn.Module:
    """A LayerNorm, or nothing where the config removes it (`normformer`, `patch_layernorm`)."""
    return nn.LayerNorm(d) if on else nn.Identity()


def add_ffn(module: nn.Module, d: int, ffn_dim: int, normformer: bool = True) -> None:
    """Give `module` the FFN's weights under OFA's names (a layer's own, or its image expert's)."""
    module.fc1 = nn.Linear(d, ffn_dim)
    module.ffn_layer_norm = norm(ffn_dim, normformer)
    module.fc2 = nn.Linear(ffn_dim, d)
    module.final_layer_norm = nn.LayerNorm(d)


class EncoderLayer(nn.Module):
    """Pre-LN block: attention (+ mid LayerNorm), then FFN with a LayerNorm on its hidden.
    `modality_experts`: a vision expert FFN beside the own (language) one, and in a `fusion` layer a
    vision-language expert too (OFAConfig.modality_experts)."""

    def __init__(
        self,
        cfg: OFAConfig,
        heads: int,
        ffn_dim: int,
        drop_path_rate: float,
        modality_experts: bool = False,
        fusion: bool = False,
    ):
        super().__init__()
        d = cfg.d_model
        self.self_attn = Attention(d, heads, cfg.attention_dropout, cfg.attention_scale)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.self_attn_mid_layer_norm = norm(d, cfg.normformer)
        add_ffn(self, d, ffn_dim, cfg.normformer)
        self.image_ffn = self.vision_ffn = self.vl_ffn = None
        for name, on in (
            ("image_ffn", cfg.image_expert),
            ("vision_ffn", modality_experts),
            ("vl_ffn", modality_experts and fusion),
        ):
            if on:
                setattr(self, name, nn.Module())
                add_ffn(getattr(self, name), d, ffn_dim, cfg.normformer)
        self.dropout = nn.Dropout(cfg.dropout)
        self.activation_dropout = nn.Dropout(cfg.activation_dropout)
        self.drop_path_rate = drop_path_rate

    def residual(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return x + drop_path(self.dropout(h), self.drop_path_rate, self.training)

    def _ffn(self, x: torch.Tensor, w: nn.Module) -> torch.Tensor:
        h = self.activation_dropout(F.gelu(w.fc1(w.final_layer_norm(x))))
        return self.residual(x, w.fc2(w.ffn_layer_norm(h)))

    def feed_forward(
        self, x: torch.Tensor, image_rows: torch.Tensor | bool = False, route: Route | None = None
    ) -> torch.Tensor:
        """The shared FFN; with an image expert, the rows `image_rows` (`code_rows`) run the expert's;
        with modality experts, each part of `route` (`Encoder.routes`) runs its expert."""
        if route is not None:
            return self.routed(x, route)
        if self.image_ffn is None or image_rows is False:
            return self._ffn(x, self)
        if image_rows is True:
            return self._ffn(x, self.image_ffn)
        out = torch.empty_like(x)
        out[image_rows] = self._ffn(x[image_rows], self.image_ffn)
        out[~image_rows] = self._ffn(x[~image_rows], self)
        return out

    def routed(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        """The FFN of each (rows, positions) part of `route` by its expert (None: the own FFN)."""
        expert = lambda name: self if name is None else getattr(self, name)
        if len(route) == 1:
            return self._ffn(x, expert(route[0][2]))
        out = torch.empty_like(x)
        for rows, cols, name in route:
            out[rows, cols] = self._ffn(x[rows, cols], expert(name))
        return out

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor,
        image_rows: torch.Tensor | bool = False,
        route: Route | None = None,
    ) -> torch.Tensor:
        h = self.self_attn_layer_norm(x)
        x = self.residual(
            x, self.self_attn_mid_layer_norm(self.self_attn(h, bias, self.self_attn.project_kv(h)))
        )
        return self.feed_forward(x, image_rows, route)


class DecoderLayer(EncoderLayer):
    """Self-attention over past steps (cached keys/values), cross-attention to the encoder, FFN."""

    def __init__(self, cfg: OFAConfig, heads: int, ffn_dim: int, drop_path_rate: float):
        super().__init__(cfg, heads, ffn_dim, drop_path_rate)
        self.cross_attn = Attention(cfg.d_model, heads, cfg.attention_dropout, cfg.attention_scale)
        self.cross_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.cross_attn_mid_layer_norm = norm(cfg.d_model, cfg.normformer)

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        self_bias: torch.Tensor,
        cross_bias: torch.Tensor,
        cross_kv: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None = None,
        index: int = 0,
        image_rows: torch.Tensor | bool = False,
    ) -> torch.Tensor:
        """`cache`: this step's keys/values join the cached ones (layer `index`), in place."""
        h = self.self_attn_layer_norm(x)
        k, v = self.self_attn.project_kv(h)
        if cache is not None:
            k, v = cache.append(index, k, v)
        x = self.residual(x, self.self_attn_mid_layer_norm(self.self_attn(h, self_bias, (k, v))))
        h = self.cross_attn(self.cross_attn_layer_norm(x), cross_bias, cross_kv)
        x = self.residual(x, self.cross_attn_mid_layer_norm(h))
        return self.feed_forward(x, image_rows)


def position_bias(
    q_linear: nn.Linear | None,
    k_linear: nn.Linear | None,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    heads: int,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Absolute position bias `(W_q p_i * s) . (W_k p_j)` per head: [..., H, Tq, Tk] (zeros for a
    model without it, `abs_pos_bias=False`). `keys`: `position_keys(k_linear, k_pos, heads)` if the
    caller has it already (the decoder keeps the encoder positions' across steps)."""
    if q_linear is None or k_linear is None:
        shape = (
            *torch.broadcast_shapes(q_pos.shape[:-2], k_pos.shape[:-2]),
            heads,
            q_pos.size(-2),
            k_pos.size(-2),
        )
        return q_pos.new_zeros(shape)

    q = split_heads(q_linear(q_pos), heads)
    keys = position_keys(k_linear, k_pos, heads) if keys is None else keys
    return (q * (q.size(-1) * 2) ** -0.5) @ keys


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., T, H * hd] -> [..., H, T, hd]."""
    return t.unflatten(-1, (heads, -1)).transpose(-3, -2)


def position_keys(k_linear: nn.Linear, k_pos: torch.Tensor, heads: int) -> torch.Tensor:
    """The key side of `position_bias`: [..., H, hd, Tk]."""
    return split_heads(k_linear(k_pos), heads).transpose(-1, -2)


def position_linears(d: int, on: bool) -> tuple[nn.Linear | None, nn.Linear | None]:
    """The q/k projections of one absolute position bias, or none (`abs_pos_bias=False`)."""
    return (nn.Linear(d, d), nn.Linear(d, d)) if on else (None, None)


def relative_bias(table: nn.Embedding, buckets: torch.Tensor) -> torch.Tensor:
    """Look up a per-layer relative position table: [..., Tq, Tk] bucket ids -> [..., H, Tq, Tk]."""
    out = F.embedding(buckets, table.weight)
    return out.movedim(out.dim() - 1, out.dim() - 3)  # non-negative dims: ONNX's Transpose needs them


def masked(bias: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Put the most negative float where `mask` is True (finite, so a fully masked row stays finite)."""
    return bias.masked_fill(mask, torch.finfo(bias.dtype).min)


# ---------------------------------------------------------------------------------------------
# Encoder and decoder


class Stack(nn.Module):
    """What encoder and decoder share: token embedding (tied), 1D/2D absolute positions with their
    LayerNorms, one relative-position table per layer, the final LayerNorm."""

    def __init__(self, cfg: OFAConfig, embed_tokens: nn.Embedding, layers: int, heads: int):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.embed_tokens = embed_tokens
        self.layernorm_embedding = nn.LayerNorm(d)
        self.embed_positions = nn.Embedding(cfg.max_positions + 2, d)
        self.embed_image_positions = nn.Embedding(cfg.image_bucket_size**2 + 1, d)
        self.pos_ln = nn.LayerNorm(d)
        self.image_pos_ln = nn.LayerNorm(d)
        self.layer_norm = nn.LayerNorm(d)
        self.token_rel_pos_table_list = nn.ModuleList(
            nn.Embedding(2 * cfg.token_bucket_size - 1, heads) for _ in range(layers)
        )
        self.image_rel_pos_table_list = nn.ModuleList(
            nn.Embedding((2 * cfg.image_bucket_size - 1) ** 2 + 3, heads) for _ in range(layers)
        )
        self.register_buffer(
            "token_rp_bucket",
            token_bucket_positions(cfg.token_bucket_size, cfg.max_positions),
            persistent=False,
        )
        self.register_buffer(
            "image_rp_bucket", image_bucket_positions(cfg.image_bucket_size), persistent=False
        )
        self.dropout = nn.Dropout(cfg.dropout)


class Encoder(Stack):
    def __init__(self, cfg: OFAConfig, embed_tokens: nn.Embedding):
        super().__init__(cfg, embed_tokens, cfg.encoder_layers, cfg.encoder_heads)
        d = cfg.d_model
        self.type_embedding = nn.Embedding(2, d)
        self.embed_images = ResNet(cfg.resnet_layers, cfg.resnet_width, cfg.resnet_drop_path_rate)
        self.image_proj = nn.Linear(self.embed_images.out_channels, d)
        self.image_skip_proj = nn.Linear(self.embed_images.stage_channels[0], d) if cfg.image_skip else None
        self.image_pos_proj = nn.Linear(d, d) if cfg.image_pos_content else None
        self.image_code_proj = nn.Linear(d, d) if cfg.image_tokens else None
        self.patch_layernorm_embedding = norm(d, cfg.patch_layernorm)
        self.pos_q_linear, self.pos_k_linear = position_linears(d, cfg.abs_pos_bias)
        rates = linspace(cfg.encoder_drop_path_rate, cfg.encoder_layers)
        first_fusion = cfg.encoder_layers - cfg.fusion_layers
        self.layers = nn.ModuleList(
            EncoderLayer(
                cfg, cfg.encoder_heads, cfg.encoder_ffn_dim, rate, cfg.modality_experts, i >= first_fusion
            )
            for i, rate in enumerate(rates)
        )

    def _image_features(self, images: torch.Tensor, masks: torch.Tensor | None) -> list[torch.Tensor]:
        """ResNet stage outputs. In a batch that mixes rows with and without an image (mask False: a
        text-to-image source), the latter stay zero and out of the stem, so their blank pixels do not
        enter BatchNorm's batch statistics in training (their tokens are masked out anyway)."""
        if masks is None or bool(masks.all()) or not bool(masks.any()):
            return self.embed_images.stages(images)
        rows = masks.bool()
        outs = self.embed_images.stages(images[rows])
        full = [o.new_zeros(images.shape[0], *o.shape[1:]) for o in outs]
        for f, o in zip(full, outs, strict=True):
            f[rows] = o
        return full

    def _code_embeddings(self, codes: torch.Tensor | None, h: int, w: int) -> torch.Tensor:
        """Token embeddings of a [B, gh, gw] grid of code ids, averaged onto the h x w patch grid and
        normalised (no affine: the projection after it starts at zero when fine-tuning turns it on)."""
        if codes is None:
            raise ValueError(
                "this model reads each image's VQ codes as well (image_tokens=True); pass image_codes"
            )
        gh, gw = codes.shape[-2:]
        if gh % h or gw % w:
            raise ValueError(f"a {gh}x{gw} code grid does not pool onto the {h}x{w} patch grid")
        emb = self.embed_tokens(codes).permute(0, 3, 1, 2)
        pooled = F.avg_pool2d(emb, (gh // h, gw // w)).flatten(2).transpose(1, 2)
        return F.layer_norm(pooled, pooled.shape[-1:])

    def embed_patches(
        self,
        images: torch.Tensor,
        masks: torch.Tensor | None = None,
        codes: torch.Tensor | None = None,
        image_rows: torch.Tensor | bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Patch embeddings [B, h*w, d] as the transformer reads them (before dropout), the normalised
        image positions [1, h*w, d] and the position ids [h*w] the relative bias tables index.
        `codes`: the images' VQ code ids, for an `image_tokens` model; their term joins after the
        patch LayerNorm, so stem features of a large norm do not drown it. With `image_expert` only
        the image-output rows (`image_rows`, as `code_rows` gives them) read it."""
        cfg, types = self.cfg, self.type_embedding.weight
        *early, feats = self._image_features(images, masks)
        h, w = feats.shape[-2:]
        if max(h, w) > cfg.image_bucket_size:
            raise ValueError(
                f"image gives a {h}x{w} patch grid; at most {cfg.image_bucket_size} per side "
                f"({cfg.image_bucket_size * 16} px) fit the position table"
            )
        img = self.image_proj(feats.flatten(2).transpose(1, 2)) + types[1]
        if self.image_skip_proj is not None:
            pooled = F.adaptive_avg_pool2d(early[0], (h, w))
            img = img + self.image_skip_proj(pooled.flatten(2).transpose(1, 2))
        ids = image_position_ids(h, w, cfg.image_bucket_size).to(images.device)
        pos = self.image_pos_ln(self.embed_image_positions(ids))[None]
        if self.image_pos_proj is not None:
            img = img + self.image_pos_proj(pos)
        img = self.patch_layernorm_embedding(img)
        if self.image_code_proj is not None and not cfg.image_expert:
            img = img + self.image_code_proj(self._code_embeddings(codes, h, w))
        elif self.image_code_proj is not None and image_rows is not False:
            term = self.image_code_proj(self._code_embeddings(codes, h, w))
            img = img + (term if image_rows is True else term * image_rows[:, None, None].to(term.dtype))
        return img, pos, ids

    def routes(
        self, batch: int, patches: int, text: int, patch_masks: torch.Tensor | None, image_rows
    ) -> tuple[Route, Route]:
        """The FFN routing of the non-fusion and of the fusion layers (`modality_experts`), for inputs
        of `patches` image positions followed by `text` token positions: patches to the vision expert,
        text to the own FFN, except rows with an image (`patch_masks`) and text in a fusion layer (the
        VL expert everywhere) and image-output rows (`image_rows`: the image expert everywhere)."""
        device = self.type_embedding.weight.device
        code = image_rows if torch.is_tensor(image_rows) else torch.full((batch,), image_rows, device=device)
        image = torch.ones_like(code) if patch_masks is None else patch_masks.bool()
        fused = image & ~code if patches and text else torch.zeros_like(code)
        patch_cols, text_cols = slice(0, patches), slice(patches, patches + text)
        all_cols = slice(0, patches + text)
        vision, vl, image_out = VISION_EXPERT[:-1], VL_EXPERT[:-1], EXPERT[:-1]

        def parts(*groups: tuple[torch.Tensor, slice, str | None]) -> Route:
            out = []
            for mask, cols, name in groups:
                sel = select_rows(mask)
                if sel is not False and cols.stop > cols.start:
                    out.append((slice(None) if sel is True else sel, cols, name))
            return out

        by_position = ~code & ~fused
        plain = parts((~code, patch_cols, vision), (~code, text_cols, None), (code, all_cols, image_out))
        fusion = parts(
            (by_position, patch_cols, vision),
            (by_position, text_cols, None),
            (fused, all_cols, vl),
            (code, all_cols, image_out),
        )
        return plain, fusion

    def forward(
        self,
        input_ids: torch.Tensor,
        patch_images: torch.Tensor | None = None,
        patch_masks: torch.Tensor | None = None,
        image_codes: torch.Tensor | None = None,
        code_mask: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """`code_mask` [B]: rows whose decoder writes image codes (the `image_expert`'s rows).
        `input_ids` may have no columns (an image alone, `OFAModel.embed`)."""
        cfg, (B, L) = self.cfg, input_ids.shape
        if cfg.max_positions < L:
            raise ValueError(f"source has {L} tokens; this model takes at most {cfg.max_positions}")
        image_rows = code_rows(code_mask) if cfg.image_expert else False
        types = self.type_embedding.weight
        x = self.dropout(self.layernorm_embedding(self.embed_tokens(input_ids) + types[0]))
        padding = input_ids.eq(PAD_ID)
        pos = self.pos_ln(self.embed_positions.weight[:L]).expand(B, L, -1)
        image_rel_ids = None
        if patch_images is not None:
            img, img_pos, image_rel_ids = self.embed_patches(
                patch_images, patch_masks, image_codes, image_rows
            )
            img_pos = img_pos.expand(B, -1, -1)
            x = torch.cat([self.dropout(img), x], dim=1)
            pos = torch.cat([img_pos, pos], dim=1)
            img_pad = padding.new_zeros(B, img.shape[1])
            if patch_masks is not None:
                img_pad = img_pad | ~patch_masks.bool()[:, None]
            padding = torch.cat([img_pad, padding], dim=1)
        has_pads = bool(padding.any())
        if has_pads:
            x = x * (~padding).unsqueeze(-1).type_as(x)
        S, N = x.size(1), x.size(1) - L
        abs_bias = position_bias(self.pos_q_linear, self.pos_k_linear, pos[:1], pos[:1], cfg.encoder_heads)
        plain = fusion = None
        if cfg.modality_experts:
            plain, fusion = self.routes(B, N, L, patch_masks if N else None, image_rows)
        for i, layer in enumerate(self.layers):
            rel = abs_bias.new_zeros(cfg.encoder_heads, S, S)
            rel[:, N:, N:] = relative_bias(self.token_rel_pos_table_list[i], self.token_rp_bucket[:L, :L])
            if image_rel_ids is not None:
                buckets = self.image_rp_bucket[image_rel_ids][:, image_rel_ids]
                rel[:, :N, :N] = relative_bias(self.image_rel_pos_table_list[i], buckets)
            bias = abs_bias + rel
            if has_pads:
                bias = masked(bias, padding[:, None, None, :])
            x = layer(x, bias, image_rows, fusion if layer.vl_ffn is not None else plain)
        return EncoderOutput(self.layer_norm(x), padding, pos, code_mask)


class Decoder(Stack):
    def __init__(self, cfg: OFAConfig, embed_tokens: nn.Embedding):
        super().__init__(cfg, embed_tokens, cfg.decoder_layers, cfg.decoder_heads)
        d = cfg.d_model
        self.code_layernorm_embedding = nn.LayerNorm(d)
        self.self_pos_q_linear, self.self_pos_k_linear = position_linears(d, cfg.abs_pos_bias)
        self.cross_pos_q_linear, self.cross_pos_k_linear = position_linears(
            d, cfg.abs_pos_bias and cfg.cross_pos_bias
        )
        rates = linspace(cfg.decoder_drop_path_rate, cfg.decoder_layers)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, cfg.decoder_heads, cfg.decoder_ffn_dim, rate) for rate in rates
        )
        self.register_buffer(
            "image_position_idx",
            decoder_code_positions(cfg.code_grid_size, cfg.image_bucket_size),
            persistent=False,
        )
        # Set by `quantize.quantize_model`: an int8 linear over the tied embedding for the logits.
        self.output_linear: nn.Module | None = None

    def position_biases(
        self,
        image: bool,
        past: int,
        total: int,
        enc: EncoderOutput,
        cross_keys: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Self- and cross-attention absolute biases for steps past..total-1 (text or code positions),
        or with `rows` for one step of each row at its own position (`KVCache.lengths`); `cross_keys`:
        `position_keys` of the encoder positions, where the cache has them."""
        if image:
            if total > self.image_position_idx.numel():
                raise ValueError(f"code output of {total} steps exceeds the code position table")
            tgt = self.image_pos_ln(self.embed_image_positions(self.image_position_idx[:total]))
        else:
            tgt = self.pos_ln(self.embed_positions.weight[:total])
        heads = self.cfg.decoder_heads
        query = tgt[past:] if rows is None else tgt[rows].unsqueeze(1)  # [T, d] or [B, 1, d]
        self_bias = position_bias(self.self_pos_q_linear, self.self_pos_k_linear, query, tgt, heads)
        cross_bias = position_bias(
            self.cross_pos_q_linear, self.cross_pos_k_linear, query, enc.pos_embed, heads, cross_keys
        )
        return self_bias.unsqueeze(0) if rows is None else self_bias, cross_bias

    def encoder_side(self, enc: EncoderOutput, cache: KVCache) -> None:
        """Fill `cache` with what depends on `enc` alone: per layer the cross-attention keys/values
        and the keys of the cross-attention position bias."""
        if not cache.for_source(enc):
            cache.cross_kv = [layer.cross_attn.project_kv(enc.hidden) for layer in self.layers]
            cache.source = enc
        if cache.cross_pos_k is None and self.cross_pos_k_linear is not None:
            cache.cross_pos_k = position_keys(self.cross_pos_k_linear, enc.pos_embed, self.cfg.decoder_heads)

    def forward(
        self, tokens: torch.Tensor, enc: EncoderOutput, cache: KVCache | None, use_cache: bool
    ) -> tuple[torch.Tensor, KVCache | None]:
        cfg, (B, T) = self.cfg, tokens.shape
        if cache is not None and not use_cache:
            raise ValueError("use_cache=False decodes from the start: pass no cache")
        past = cache.length if cache is not None else 0
        total = past + T
        if total > cfg.max_positions:
            raise ValueError(
                f"decoder reached {total} positions; this model takes at most {cfg.max_positions}"
            )
        code = enc.code_mask
        rows = code_rows(code)
        any_code, all_code = rows is not False, rows is True
        # Rows at their own positions (a step-wise batch): one token each, text rows only.
        positions = cache.lengths if cache is not None else None
        if positions is not None and (T != 1 or any_code):
            raise ValueError("rows at different positions decode one text token per step")

        x = self.embed_tokens(tokens)
        if all_code:
            x = self.code_layernorm_embedding(x)
        elif any_code:
            x = torch.where(
                code[:, None, None], self.code_layernorm_embedding(x), self.layernorm_embedding(x)
            )
        else:
            x = self.layernorm_embedding(x)
        x = self.dropout(x)

        if use_cache:
            cache = cache if cache is not None else KVCache([], [], 0)
            self.encoder_side(enc, cache)
        cross_keys = cache.cross_pos_k if cache is not None else None
        self_abs, cross_abs = self.position_biases(all_code, past, total, enc, cross_keys, positions)
        if any_code and not all_code:
            img_self, img_cross = self.position_biases(True, past, total, enc, cross_keys)
            sel = code[:, None, None, None]
            self_abs, cross_abs = torch.where(sel, img_self, self_abs), torch.where(sel, img_cross, cross_abs)
        cross_bias = (
            masked(cross_abs, enc.padding_mask[:, None, None, :]) if enc.padding_mask.any() else cross_abs
        )
        causal = None  # masked keys: the future, or a shorter row's unused slots
        if T > 1:
            causal = torch.ones(T, total, dtype=torch.bool, device=tokens.device).triu(past + 1)
        if positions is None:
            text_buckets = self.token_rp_bucket[past:total, :total]
        else:
            text_buckets = self.token_rp_bucket[positions, :total].unsqueeze(1)  # [B, 1, total]
            keys = torch.arange(total, device=tokens.device)
            causal = (keys > positions[:, None])[:, None, None, :]
        code_ids = self.image_position_idx[:total] if any_code else None

        for i, layer in enumerate(self.layers):
            rel = None
            if not all_code:
                rel = relative_bias(self.token_rel_pos_table_list[i], text_buckets)
            if any_code:
                img_rel = relative_bias(
                    self.image_rel_pos_table_list[i], self.image_rp_bucket[code_ids[past:]][:, code_ids]
                )
                rel = img_rel if rel is None else torch.where(code[:, None, None, None], img_rel, rel)
            self_bias = self_abs + rel
            if causal is not None:
                self_bias = masked(self_bias, causal)
            if self_bias.size(0) != B:
                self_bias = self_bias.expand(B, -1, -1, -1)
            cross_kv = cache.cross_kv[i] if cache is not None else layer.cross_attn.project_kv(enc.hidden)
            x = layer(x, self_bias, cross_bias, cross_kv, cache, i, rows)
        if cache is not None:
            cache.length = total
            if positions is not None:
                cache.lengths = positions + 1
        return self.output_projection(self.layer_norm(x)), cache

    def output_projection(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the tied embedding. Without autograd, from a contiguous [d, vocab] copy of the
        weight: one step's [B, d] @ [d, V] streams it at about twice F.linear's speed on CPU (its
        gemv over [V, d] rows reads ~7.5 GB/s; bench/README.md). The copy is remade whenever the
        weight changes (an optimizer step or a load bumps its version). A quantized model's int8
        `output_linear` replaces both."""
        if self.output_linear is not None:
            return self.output_linear(x)
        weight = self.embed_tokens.weight
        if torch.is_grad_enabled() and weight.requires_grad:
            return F.linear(x, weight)
        key = (weight.data_ptr(), weight._version, weight.device, weight.dtype)
        if getattr(self, "_out_key", None) != key:
            with torch.no_grad():
                self._out_weight_t = weight.detach().t().contiguous()
            self._out_key = key
        return x @ self._out_weight_t


class OFAModel(nn.Module):
    """Encoder-decoder over the joint vocabulary; one embedding matrix for input and output."""

    def __init__(self, config: OFAConfig):
        super().__init__()
        self.config = config
        embed_tokens = nn.Embedding(config.vocab_size, config.d_model, padding_idx=PAD_ID)
        self.encoder = Encoder(config, embed_tokens)
        self.decoder = Decoder(config, embed_tokens)
        if config.itc_dim:  # the retrieval head (`embed`): one projection per modality, CLIP's temperature
            self.itc_image_proj = nn.Linear(config.d_model, config.itc_dim, bias=False)
            self.itc_text_proj = nn.Linear(config.d_model, config.itc_dim, bias=False)
            self.itc_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.apply(self._init_weights)
        for table in [
            *self.encoder.token_rel_pos_table_list,
            *self.encoder.image_rel_pos_table_list,
            *self.decoder.token_rel_pos_table_list,
            *self.decoder.image_rel_pos_table_list,
        ]:
            nn.init.zeros_(table.weight)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Xavier for matrices, N(0, 0.02) for embeddings. BART/OFA's N(0, 0.02) for matrices too
        leaves a 256-wide model's attention logits ~0.07 apart at the start, so attention is uniform
        and reading an attribute off one patch is learned slowly: in the binding test bed Xavier
        passes N(0, 0.02)'s 400-step accuracy within 100 steps (bench/README.md)."""
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
            if m.padding_idx is not None:
                nn.init.zeros_(m.weight[m.padding_idx])

    def encode(
        self,
        input_ids: torch.Tensor,
        patch_images: torch.Tensor | None = None,
        patch_masks: torch.Tensor | None = None,
        code_mask: torch.Tensor | None = None,
        image_codes: torch.Tensor | None = None,
    ) -> EncoderOutput:
        return self.encoder(input_ids, patch_images, patch_masks, image_codes, code_mask)

    def decode(
        self, tokens: torch.Tensor, enc: EncoderOutput, cache: KVCache | None = None, use_cache: bool = True
    ) -> tuple[torch.Tensor, KVCache | None]:
        """Logits for `tokens`, which continue after `cache.length` positions (from 0 without a cache).
        The cache is advanced in place and returned (a new one without `cache`; None with
        `use_cache=False`)."""
        return self.decoder(tokens, enc, cache, use_cache)

    def forward(
        self,
        input_ids: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        patch_images: torch.Tensor | None = None,
        patch_masks: torch.Tensor | None = None,
        code_mask: torch.Tensor | None = None,
        image_codes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, EncoderOutput]:
        enc = self.encode(input_ids, patch_images, patch_masks, code_mask, image_codes)
        logits, _ = self.decode(decoder_input_ids, enc, use_cache=False)
        return logits, enc

    @property
    def has_retrieval(self) -> bool:
        """Whether `embed` works (a retrieval head, `itc_dim` > 0)."""
        return self.config.itc_dim > 0

    def embed(
        self,
        input_ids: torch.Tensor | None = None,
        patch_images: torch.Tensor | None = None,
        patch_masks: torch.Tensor | None = None,
        image_codes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, itc_dim] unit-norm retrieval embeddings of texts (`input_ids`, PAD_ID-padded) or of
        images, exactly one of the two: the encoder reads that modality alone (with `modality_experts`
        only its own expert runs), its output is mean-pooled over the non-pad positions and projected
        per modality. Mean rather than a first position: there is no CLS token, an image alone has no
        bos, and a fine-tuned checkpoint's mean already summarises the whole input."""
        if not self.has_retrieval:
            raise ValueError("this model has no retrieval head (itc_dim=0)")
        if (input_ids is None) == (patch_images is None):
            raise ValueError("embed takes exactly one of input_ids (texts) and patch_images (images)")
        if input_ids is not None:
            enc, proj = self.encoder(input_ids), self.itc_text_proj
        else:
            no_text = torch.empty(len(patch_images), 0, dtype=torch.long, device=patch_images.device)
            enc, proj = self.encoder(no_text, patch_images, patch_masks, image_codes), self.itc_image_proj
        keep = (~enc.padding_mask).unsqueeze(-1).type_as(enc.hidden)
        pooled = (enc.hidden * keep).sum(1) / keep.sum(1).clamp(min=1)
        return F.normalize(proj(pooled), dim=-1)

    def itc_scale(self) -> torch.Tensor:
        """The contrastive logits' scale: exp of the learned log scale, clamped at 100 (CLIP)."""
        return self.itc_logit_scale.exp().clamp(max=100)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def itc_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric in-batch InfoNCE (CLIP, VLMo's ITC): row i's image and text are a pair, every other
    row of the batch is a negative, in both directions."""
    logits = logit_scale * image_emb @ text_emb.T
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def in_batch_recall(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """Recall@1 of in-batch retrieval, both directions averaged (chance: 1 / batch)."""
    sims = image_emb @ text_emb.T
    target = torch.arange(len(sims), device=sims.device)
    hits = (sims.argmax(1) == target).float().mean() + (sims.argmax(0) == target).float().mean()
    return float(hits) / 2


# ---------------------------------------------------------------------------------------------
# Named sizes


def list_models() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def model_config(name: str, **overrides) -> OFAConfig:
    path = CONFIG_DIR / f"{name}.json"
    if not path.exists():
        raise ValueError(f"unknown model size {name!r}; known: {', '.join(list_models())}")
    return OFAConfig.from_dict({**json.loads(path.read_text()), **overrides})


def build_model(name_or_config: str | OFAConfig | dict, **overrides) -> OFAModel:
    """Make a randomly initialised model from a size name, a config, or a config dict."""
    if isinstance(name_or_config, str):
        cfg = model_config(name_or_config, **overrides)
    elif isinstance(name_or_config, dict):
        cfg = OFAConfig.from_dict({**name_or_config, **overrides})
    else:
        cfg = replace(name_or_config, **overrides)
    return OFAModel(cfg)
