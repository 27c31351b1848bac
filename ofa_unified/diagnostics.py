"""Is the model reading the image? Measurements logged during training and by the binding ladder.

* `image_gap`: per-task loss with each sample's own image against another sample's image (the batch
  rolled by one). A model answering from language priors has no gap; the gap opens as soon as the
  answers depend on the pixels.
* `position_bias_scale`: the standard deviation of the decoupled absolute position bias
  `(W_q p_i * s) . (W_k p_j)` for each attention kind. Content logits are O(1); a bias that grows far
  beyond that makes attention a function of position alone.
* `cross_attention_entropy`: mean entropy (nats) of each decoder layer's cross-attention over the
  image patches. Uniform over 64 patches is 4.16; near zero means every query looks at one patch.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

from ofa_unified.model import OFAModel, image_position_ids, position_bias


def rolled(batch: dict) -> dict:
    """The batch with every row's image (and its codes and mask) taken from the next row."""
    out = dict(batch)
    for key in ("patch_images", "patch_masks"):
        if out.get(key) is not None:
            out[key] = out[key].roll(1, 0)
    return out


@torch.no_grad()
def position_bias_scale(model: OFAModel, grid: int, text_len: int = 32) -> dict[str, float]:
    """Std of the absolute position bias per attention kind, over a `grid` x `grid` patch grid followed
    by `text_len` text positions (encoder), and `text_len` decoder text steps (self, cross)."""
    cfg, enc, dec = model.config, model.encoder, model.decoder
    ids = image_position_ids(grid, grid, cfg.image_bucket_size).to(enc.embed_image_positions.weight.device)
    src = torch.cat(
        [enc.image_pos_ln(enc.embed_image_positions(ids)), enc.pos_ln(enc.embed_positions.weight[:text_len])]
    )
    tgt = dec.pos_ln(dec.embed_positions.weight[:text_len])
    return {
        "encoder": position_bias(enc.pos_q_linear, enc.pos_k_linear, src, src, cfg.encoder_heads)
        .std()
        .item(),
        "decoder_self": position_bias(
            dec.self_pos_q_linear, dec.self_pos_k_linear, tgt, tgt, cfg.decoder_heads
        )
        .std()
        .item(),
        "decoder_cross": position_bias(
            dec.cross_pos_q_linear, dec.cross_pos_k_linear, tgt, src, cfg.decoder_heads
        )
        .std()
        .item(),
    }


@torch.no_grad()
def cross_attention_entropy(model: OFAModel, forward, num_patches: int) -> list[float]:
    """Mean entropy over the first `num_patches` encoder positions of each decoder layer's
    cross-attention (renormalised over the patches), seen while `forward()` runs the model once."""
    found: dict[int, list[float]] = defaultdict(list)
    hooks = []
    for i, layer in enumerate(model.decoder.layers):
        attn = layer.cross_attn

        def hook(module, args, _out, i=i) -> None:
            x, bias, (k, _v) = args
            q = module.split(module.q_proj(x))
            scores = (q @ k.transpose(-1, -2)) * module.scaling + bias
            p = F.softmax(scores[..., :num_patches].float(), dim=-1)
            found[i].append(float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean()))

        hooks.append(attn.register_forward_hook(hook))
    try:
        forward()
    finally:
        for h in hooks:
            h.remove()
    return [sum(v) / len(v) for _, v in sorted(found.items())]
