"""ONNX export of the encoder and of one cached decoder step, and `OnnxModel`, which runs them on
onnxruntime behind the `encode`/`decode` calls `generate.py` makes (`pip install -e '.[onnx]'`).

    export_onnx(model, "model_onnx/")          # encoder.onnx, encoder_side.onnx, step.onnx
    onnx_model = OnnxModel("model_onnx/")
    generate(onnx_model, onnx_model.encode(ids, images, masks), GenerationConfig(max_new_tokens=16))

Three graphs, as the torch model splits its work: the encoder; the decoder's encoder side (the
cross-attention keys/values and position keys, once per request, `Decoder.encoder_side`); one
decoder step. The step runs the same `Decoder.forward` over `_ConcatCache`, which takes the past
self-attention keys/values as explicit inputs and returns them with the new position appended:
`KVCache`'s preallocated buffers are written in place, which an ONNX graph cannot express.

What the export fixes, because the graphs are traced (the legacy TorchScript exporter, `dynamo=False`):
batch, text length, encoder length and past length stay dynamic, but branches taken in Python are
recorded as the example input took them. So the examples have padding (the padding masks are then
always applied, which is exact where nothing is padded), every row has an image (an image-less row
runs the stem on its blank image; its patches stay masked), the step feeds one token (a longer
forced prefix is fed one token per call), and only text outputs are exported (no `code_mask`).
Models that need `image_codes` for text outputs (`image_tokens` without `image_expert`) or route
FFNs by modality (`modality_experts`) are refused.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ofa_unified.model import PAD_ID, EncoderOutput, KVCache, OFAModel

GRAPHS = ("encoder", "encoder_side", "step")
OPSET = 17


class _ConcatCache:
    """What `Decoder.forward` reads and writes of a `KVCache`, over explicit tensors: the past
    self-attention keys/values come in, `self_kv` collects them with this step's appended
    (concatenation, where KVCache writes into a buffer) and the encoder side is given."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]], cross_kv, cross_pos_k) -> None:
        self.past = past
        self.self_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cross_kv = cross_kv
        self.cross_pos_k = cross_pos_k
        self.length = past[0][0].size(2)
        self.lengths = None  # every row at `length` (KVCache's per-row positions are not exported)

    def for_source(self, enc: EncoderOutput) -> bool:
        return True  # the encoder side came in as inputs

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past_k, past_v = self.past[layer]
        self.self_kv.append((torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)))
        return self.self_kv[-1]


class EncoderGraph(nn.Module):
    """(input_ids, patch_images, patch_masks) -> the EncoderOutput's tensors."""

    def __init__(self, model: OFAModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, patch_images: torch.Tensor, patch_masks: torch.Tensor):
        enc = self.model.encode(input_ids, patch_images, patch_masks)
        return enc.hidden, enc.padding_mask, enc.pos_embed


class EncoderSideGraph(nn.Module):
    """An encoder output -> per layer the cross-attention keys and values, then the position keys
    of the cross-attention bias (zeros for a model without that bias: the step ignores them)."""

    def __init__(self, model: OFAModel) -> None:
        super().__init__()
        self.decoder = model.decoder

    def forward(self, hidden: torch.Tensor, padding_mask: torch.Tensor, pos_embed: torch.Tensor):
        cache = KVCache([], [], 0)
        self.decoder.encoder_side(EncoderOutput(hidden, padding_mask, pos_embed), cache)
        pos_k = cache.cross_pos_k
        if pos_k is None:
            heads = self.decoder.cfg.decoder_heads
            pos_k = pos_embed.new_zeros(
                pos_embed.size(0), heads, pos_embed.size(2) // heads, pos_embed.size(1)
            )
        return (*(t for kv in cache.cross_kv for t in kv), pos_k)


class StepGraph(nn.Module):
    """One decoder step: (tokens [B, 1], the encoder output's mask and positions, the encoder side,
    past keys/values per layer) -> (logits [B, 1, V], per layer the keys/values with this step's)."""

    def __init__(self, model: OFAModel) -> None:
        super().__init__()
        self.decoder = model.decoder
        self.layers = model.config.decoder_layers

    def forward(self, tokens, padding_mask, pos_embed, cross_pos_k, *kv: torch.Tensor):
        n = self.layers
        cross = list(zip(kv[0 : 2 * n : 2], kv[1 : 2 * n : 2], strict=True))
        past = list(zip(kv[2 * n :: 2], kv[2 * n + 1 :: 2], strict=True))
        if self.decoder.cross_pos_k_linear is None:
            cross_pos_k = None
        cache = _ConcatCache(past, cross, cross_pos_k)
        logits, _ = self.decoder(tokens, EncoderOutput(None, padding_mask, pos_embed), cache, True)
        return (logits, *(t for kv in cache.self_kv for t in kv))


def _kv_names(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}_{side}.{i}" for i in range(layers) for side in ("k", "v")]


def _check_exportable(model: OFAModel) -> None:
    cfg = model.config
    if cfg.modality_experts:
        raise ValueError("ONNX export does not cover modality_experts (FFN routing is chosen in Python)")
    if cfg.image_tokens and not cfg.image_expert:
        raise ValueError("ONNX export does not cover image_tokens without image_expert (needs image_codes)")


def export_onnx(model: OFAModel, directory: str | Path, opset: int = OPSET) -> dict[str, Path]:
    """Write `encoder.onnx`, `encoder_side.onnx` and `step.onnx` for `model` (float32, CPU) into
    `directory`; returns their paths by graph name."""
    _check_exportable(model)
    model = model.eval().cpu()
    cfg, out = model.config, Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    n, heads = cfg.decoder_layers, cfg.decoder_heads
    size = cfg.patch_image_size
    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 2, PAD_ID, PAD_ID]])  # padded: masks get traced in
    images, masks = torch.randn(2, 3, size, size), torch.ones(2, dtype=torch.bool)
    with torch.no_grad():
        enc = model.encode(ids, images, masks)
        side = EncoderSideGraph(model)(enc.hidden, enc.padding_mask, enc.pos_embed)
    past = [torch.zeros(2, heads, 3, cfg.d_model // heads) for _ in range(2 * n)]
    batch, src, past_len = {0: "batch"}, {0: "batch", 1: "source"}, {0: "batch", 2: "past"}
    specs = {
        "encoder": (
            EncoderGraph(model),
            (ids, images, masks),
            ["input_ids", "patch_images", "patch_masks"],
            ["hidden", "padding_mask", "pos_embed"],
            {"input_ids": {0: "batch", 1: "text"}, "patch_images": batch, "patch_masks": batch}
            | {name: src for name in ("hidden", "padding_mask", "pos_embed")},
        ),
        "encoder_side": (
            EncoderSideGraph(model),
            (enc.hidden, enc.padding_mask, enc.pos_embed),
            ["hidden", "padding_mask", "pos_embed"],
            [*_kv_names("cross", n), "cross_pos_k"],
            {name: src for name in ("hidden", "padding_mask", "pos_embed")}
            | {name: {0: "batch", 2: "source"} for name in _kv_names("cross", n)}
            | {"cross_pos_k": {0: "batch", 3: "source"}},
        ),
        "step": (
            StepGraph(model),
            (torch.tensor([[0], [0]]), enc.padding_mask, enc.pos_embed, *side[-1:], *side[:-1], *past),
            [
                "tokens",
                "padding_mask",
                "pos_embed",
                "cross_pos_k",
                *_kv_names("cross", n),
                *_kv_names("past", n),
            ],
            ["logits", *_kv_names("present", n)],
            {"tokens": batch, "padding_mask": src, "pos_embed": src, "cross_pos_k": {0: "batch", 3: "source"}}
            | {name: {0: "batch", 2: "source"} for name in _kv_names("cross", n)}
            | {name: past_len for name in _kv_names("past", n) + _kv_names("present", n)}
            | {"logits": batch},
        ),
    }
    paths = {}
    for name, (module, args, inputs, outputs, axes) in specs.items():
        paths[name] = out / f"{name}.onnx"
        # Eval mode on the wrapper too: the exporter restores each module's mode afterwards, and a
        # wrapper left in training mode would put the whole model back into it.
        module.eval()
        with torch.no_grad(), warnings.catch_warnings():
            # Expected: the branches the docstring lists (TracerWarning), the legacy exporter's
            # deprecation notice and its constant-folding notes.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
            torch.onnx.export(
                module,
                args,
                str(paths[name]),
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
            )
    return paths


@dataclass
class OnnxCache:
    """The decoding state between `OnnxModel.decode` calls: per layer the past keys/values and the
    encoder side, as numpy arrays in the step graph's input names."""

    past: dict[str, np.ndarray]
    encoder_side: dict[str, np.ndarray]

    @property
    def length(self) -> int:
        return next(iter(self.past.values())).shape[2]

    def reorder(self, idx: torch.Tensor) -> OnnxCache:
        """Keep rows `idx` (beams reordered, finished samples dropped): every array at once."""
        rows = idx.cpu().numpy()
        self.past = {k: v[rows] for k, v in self.past.items()}
        self.encoder_side = {k: v[rows] for k, v in self.encoder_side.items()}
        return self


class OnnxModel:
    """The exported graphs on onnxruntime (CPU), with the `encode`/`decode` that `generate`,
    `Decoding` and `score_candidates` call on an OFAModel; their results are torch tensors."""

    def __init__(self, directory: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.sessions = {
            name: ort.InferenceSession(
                str(Path(directory) / f"{name}.onnx"), options, providers=["CPUExecutionProvider"]
            )
            for name in GRAPHS
        }
        self.inputs = {name: {i.name for i in s.get_inputs()} for name, s in self.sessions.items()}
        self.layers = sum(name.startswith("past_k.") for name in self.inputs["step"])
        past = next(i for i in self.sessions["step"].get_inputs() if i.name == "past_k.0")
        self.heads, self.head_dim = past.shape[1], past.shape[3]

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one graph on the feeds it takes (the exporter drops inputs a graph does not read)."""
        wanted = self.inputs[graph]
        return self.sessions[graph].run(None, {k: v for k, v in feeds.items() if k in wanted})

    def encode(
        self,
        input_ids: torch.Tensor,
        patch_images: torch.Tensor,
        patch_masks: torch.Tensor | None = None,
    ) -> EncoderOutput:
        if patch_masks is None:
            patch_masks = torch.ones(len(input_ids), dtype=torch.bool)
        feeds = {
            "input_ids": input_ids.cpu().numpy(),
            "patch_images": patch_images.float().cpu().numpy(),
            "patch_masks": patch_masks.bool().cpu().numpy(),
        }
        hidden, padding, pos = (torch.from_numpy(a) for a in self._run("encoder", feeds))
        return EncoderOutput(hidden, padding, pos)

    def decode(
        self, tokens: torch.Tensor, enc: EncoderOutput, cache: OnnxCache | None = None, use_cache: bool = True
    ) -> tuple[torch.Tensor, OnnxCache]:
        """Logits [B, T, V] for `tokens`, which continue after `cache.length` positions; T > 1 runs
        the step graph once per token. The cache is advanced in place (a new one without `cache`)."""
        if not use_cache:
            raise ValueError("OnnxModel decodes with a cache only")
        feeds = {"padding_mask": enc.padding_mask.cpu().numpy(), "pos_embed": enc.pos_embed.cpu().numpy()}
        if cache is None:
            side = self._run("encoder_side", {"hidden": enc.hidden.cpu().numpy(), **feeds})
            names = [*_kv_names("cross", self.layers), "cross_pos_k"]
            empty = np.zeros((len(tokens), self.heads, 0, self.head_dim), dtype=np.float32)
            cache = OnnxCache(
                {k: empty for k in _kv_names("past", self.layers)}, dict(zip(names, side, strict=True))
            )
        logits = []
        for t in range(tokens.size(1)):
            step = {"tokens": tokens[:, t : t + 1].cpu().numpy(), **feeds, **cache.encoder_side, **cache.past}
            out, *present = self._run("step", step)
            cache.past = dict(zip(_kv_names("past", self.layers), present, strict=True))
            logits.append(torch.from_numpy(out))
        return torch.cat(logits, dim=1), cache
