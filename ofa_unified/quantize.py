"""Dynamic int8 quantization for CPU inference (`Predictor(..., quantize="int8")`).

Decoding one token at batch 1 is bound by the bytes of weights each step reads (bench/README.md,
"Decoding against transformers' BART"), so storing the matrices as int8 reads a quarter of them.
`torch.ao.quantization.quantize_dynamic` replaces every `nn.Linear` by one with int8 weights (one
scale per output row) whose input is quantized on the fly, per call, from its own range; the ResNet
stem (convolutions), embeddings and LayerNorms stay float32. The decoder's output projection, the
largest matrix (vocab x d, the tied embedding) and no `nn.Linear`, is quantized as well through an
int8 copy in `Decoder.output_linear`: the input side keeps reading the float32 embedding.

The accuracy this costs on the bundled model and the speed it buys are measured in bench/README.md
("int8 and ONNX on the CPU").
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ofa_unified.model import OFAModel

QUANTIZE_MODES = ("none", "int8")


def check_quantize(mode: str) -> str:
    """`mode` if it is one of QUANTIZE_MODES, else a ValueError naming them."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {', '.join(map(repr, QUANTIZE_MODES))}, got {mode!r}")
    return mode


def quantize_model(model: OFAModel, mode: str = "int8", output_projection: bool = True) -> OFAModel:
    """`model` itself for mode "none"; for "int8" an eval-mode copy whose linears (and, with
    `output_projection`, the logits' matmul) run with dynamically quantized int8 weights. A copy,
    because the int8 modules cannot be trained or saved as a checkpoint. CPU only: the quantized
    kernels (fbgemm/onednn) have no CUDA version."""
    if check_quantize(mode) == "none":
        return model
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cpu"}:
        raise ValueError(
            f"quantize='int8' runs on the CPU only; the model is on {', '.join(sorted(devices))}"
        )
    model = copy.deepcopy(model).eval()
    if output_projection:
        emb = model.decoder.embed_tokens
        head = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False)
        head.weight = emb.weight  # shared: the quantized copy is made from the tied embedding
        model.decoder.output_linear = head
    with warnings.catch_warnings():
        # torch >= 2.10 marks eager-mode quantization as deprecated in favour of torchao (not a
        # dependency here); the kernels are the same fbgemm/onednn ones.
        warnings.filterwarnings("ignore", message=r"(?s).*(deprecat|torchao)", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.ao.quantization.quantize_dynamic(
            model,
            {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
            dtype=torch.qint8,
            inplace=True,
        )
    return model
