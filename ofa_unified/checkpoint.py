"""Save and load checkpoints: the project's own directory format and OFA's official formats.

One entry point, `load_checkpoint(path)`, detects the format:

* own directory: `config.json` (`"format": "ofa-unified"`), `model.safetensors`, tokenizer files;
* HF-port OFA directory: `config.json` with `"model_type": "ofa"`, `model.safetensors` or
  `pytorch_model.bin`, optional `vocab.json` + `merges.txt` (GPT-2 BPE);
* fairseq `.pt`: weights under `model`, config under `cfg` or `args`. It is read by a restricted
  unpickler that never imports or calls anything outside an allow-list; fairseq/omegaconf/argparse
  config objects become plain dicts, so neither fairseq nor omegaconf needs to be installed.

The model's parameter names are the HF port's; fairseq names differ by a few renames
(`FAIRSEQ_TO_HF`). Index tables derived from the config (relative-position buckets,
`image_position_idx`) are recomputed, and checked when a file carries them.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ofa_unified.model import FFN_EXPERTS, ITC_HEAD, NON_OFA_MODULES, OFA_SETTINGS, OFAConfig, OFAModel
from ofa_unified.resnet import RESNET_LAYERS, ResNet
from ofa_unified.vocab import Vocab

FORMAT = "ofa-unified"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"

# fairseq -> HF-port renames, in this order (`attn_ln` is a substring of the two before it).
FAIRSEQ_TO_HF = (
    (".cross_attn_ln.", ".cross_attn_mid_layer_norm."),
    (".self_attn_ln.", ".self_attn_mid_layer_norm."),
    (".attn_ln.", ".self_attn_mid_layer_norm."),
    (".ffn_layernorm.", ".ffn_layer_norm."),
    (".encoder_attn_layer_norm.", ".cross_attn_layer_norm."),
    (".encoder_attn.", ".cross_attn."),
)
# Tensors every official file may hold that are derived, not learned.
DERIVED = ("token_rp_bucket", "image_rp_bucket", "image_position_idx")
TIED = ("decoder.embed_tokens.weight", "decoder.output_projection.weight")
FAIRSEQ_DROP = ("encoder.version", "decoder.version")

# OFA's official vocabulary: 50,265 BART ids (incl. <mask>), 8,192 codes, 1,000 bins.
OFA_NUM_CODES, OFA_NUM_BINS = 8192, 1000


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file and the tensors."""


# ---------------------------------------------------------------------------------------------
# Own format


def save_checkpoint(
    model: OFAModel,
    vocab: Vocab,
    directory: str | Path,
    extra: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write weights, config and tokenizer into `directory`, replacing it only once all is written.

    `dtype` stores floating tensors in a smaller type (e.g. float16 halves a bundled model); loading
    casts them back to the model's parameters' type.
    """
    directory = Path(directory)
    if len(vocab) != model.config.vocab_size:
        raise CheckpointError(
            f"vocabulary has {len(vocab)} ids but the model's vocab_size is {model.config.vocab_size}"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in TIED}
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        save_file(state, str(tmp / WEIGHTS))
        meta = {"format": FORMAT, **model.config.to_dict(), **({"meta": extra} if extra else {})}
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        vocab.save(tmp)
        _make_readable(tmp)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _make_readable(directory: Path) -> None:
    """mkdtemp makes a private (0700) directory; a checkpoint should read like any other files."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.iterdir():
        os.chmod(path, 0o666 & ~umask)


@dataclass
class Loaded:
    model: OFAModel
    vocab: Vocab
    format: str
    meta: dict


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """Load any supported checkpoint (own, HF-port directory, fairseq `.pt`) in eval mode."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        cfg_file = path / CONFIG
        if not cfg_file.exists():
            raise CheckpointError(
                f"{path} has no {CONFIG}; expected a project or HF-port OFA checkpoint directory"
            )
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
        if raw.get("format") == FORMAT:
            loaded = _load_own(path, raw)
        elif raw.get("model_type") == "ofa":
            loaded = _load_hf(path, raw)
        else:
            raise CheckpointError(f"{cfg_file}: neither format 'ofa-unified' nor model_type 'ofa'")
    else:
        loaded = _load_fairseq(path)
    loaded.model.to(device).eval()
    return loaded


def _load_own(path: Path, raw: dict) -> Loaded:
    meta = raw.pop("meta", {})
    raw.pop("format")
    config = OFAConfig.from_dict(raw)
    weights = path / WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"{path} has no {WEIGHTS}")
    model = OFAModel(config)
    load_state(model, load_file(str(weights)), source=str(weights))
    return Loaded(model, Vocab.load(path), FORMAT, meta)


# ---------------------------------------------------------------------------------------------
# Single modules saved as safetensors + JSON (the VQ tokenizer, a pretrained stem)


def write_weights(
    directory: str | Path, weights_name: str, state: dict[str, torch.Tensor], config_name: str, config: dict
) -> None:
    """Write `state` and `config` into `directory`, each under a temp name then renamed, so a
    reader never sees a half-written file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / (weights_name + ".tmp")))
    os.replace(directory / (weights_name + ".tmp"), directory / weights_name)
    (directory / (config_name + ".tmp")).write_text(json.dumps(config, indent=2) + "\n")
    os.replace(directory / (config_name + ".tmp"), directory / config_name)


def load_strict(
    module: torch.nn.Module, path: Path, fits: str, map_location: str | torch.device = "cpu"
) -> None:
    """Load the safetensors file `path` into `module`; any missing, unexpected or differently shaped
    tensor is a ValueError naming the file, what it should fit, and the first few offending keys."""
    state = load_file(str(path), device=str(map_location))
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{path} does not fit {fits}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shapes {mismatched[:5]}"
        )
    module.load_state_dict(state)


STEM_WEIGHTS, STEM_CONFIG = "stem.safetensors", "stem.json"


def save_stem(stem: ResNet, directory: str | Path, meta: dict) -> None:
    """Write a pretrained stem (`stem.safetensors`, BatchNorm statistics included) and `stem.json`
    (its `meta`: layers, width, image size, how it was trained)."""
    state = {k: v.detach().contiguous().cpu() for k, v in stem.state_dict().items()}
    write_weights(directory, STEM_WEIGHTS, state, STEM_CONFIG, meta)


def load_stem(stem: ResNet, directory: str | Path) -> dict:
    """Load `save_stem`'s weights into `stem` (every key and shape checked); returns its meta."""
    directory = Path(directory)
    if not (directory / STEM_WEIGHTS).exists():
        raise FileNotFoundError(
            f"{directory} holds no pretrained stem ({STEM_WEIGHTS}); make one with train/stem.py"
        )
    fits = "this model's image stem (resnet_layers/resnet_width differ?)"
    load_strict(stem, directory / STEM_WEIGHTS, fits)
    return json.loads((directory / STEM_CONFIG).read_text())


# ---------------------------------------------------------------------------------------------
# Official formats


def load_state(model: OFAModel, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load HF-port-named tensors: list missing/unexpected ones, name mismatched shapes."""
    own = model.state_dict()
    state = dict(state)
    embed = state.get("encoder.embed_tokens.weight")
    for key in TIED:
        if key in state:
            tied = state.pop(key)
            if embed is not None and not torch.equal(tied, embed):
                raise CheckpointError(
                    f"{source}: {key} differs from encoder.embed_tokens.weight; "
                    "this model ties input and output embeddings"
                )
    if embed is not None:
        state["decoder.embed_tokens.weight"] = embed
    for key in [k for k in state if k.rsplit(".", 1)[-1] in DERIVED]:
        given = state.pop(key)
        if key in own or key.endswith("rp_bucket"):
            expected = dict(model.named_buffers(remove_duplicate=False))[key]
            if given.shape != expected.shape or not torch.equal(given.to(expected.dtype), expected):
                raise CheckpointError(
                    f"{source}: derived table {key} {tuple(given.shape)} does not match the one "
                    f"this config gives {tuple(expected.shape)}; check the config's bucket sizes"
                )
    for key in [k for k in own if k.endswith("num_batches_tracked") and k not in state]:
        state[key] = own[key]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: missing tensors {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
            f"unexpected tensors {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}"
        )
    for key, tensor in state.items():
        if tensor.shape != own[key].shape:
            raise CheckpointError(
                f"{source}: tensor {key} has shape {tuple(tensor.shape)} in the file but "
                f"{tuple(own[key].shape)} in the model"
            )
    model.load_state_dict(state, strict=True)


def load_with_new_modules(model: OFAModel, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load `state` into `model`, whose NON_OFA_MODULES the checkpoint may lack. New modules start at
    zero, except an expert's FFN (image, vision, vision-language), which starts as a copy of its
    layer's own FFN (so the model computes what the checkpoint did until the expert trains), and the
    retrieval head, which keeps its fresh init (it changes no output of the checkpoint's).

    Returns the new tensors' names; any other missing or unexpected tensor is a CheckpointError.
    """
    own = model.state_dict()
    new = [k for k in own if k not in state and any(m in k for m in NON_OFA_MODULES.values())]
    with torch.no_grad():
        for key in new:
            expert = next((e for e in FFN_EXPERTS if e in key), None)
            shared = key.replace(expert, "") if expert else None
            if shared in state:
                own[key].copy_(state[shared])
            elif not key.startswith(ITC_HEAD):
                own[key].zero_()
    load_state(model, {**state, **{k: own[k] for k in new}}, source)
    return new


def config_from_state(state: dict[str, torch.Tensor], **fixed) -> OFAConfig:
    """Read the architecture off the tensor shapes (fairseq files carry no reliable HF config)."""

    def count(prefix: str) -> int:
        return len({k[len(prefix) :].split(".", 1)[0] for k in state if k.startswith(prefix)})

    try:
        vocab, d = state["encoder.embed_tokens.weight"].shape
        stages = tuple(count(f"encoder.embed_images.layer{i}.") for i in (1, 2, 3))
        return OFAConfig(
            vocab_size=vocab,
            d_model=d,
            encoder_layers=count("encoder.layers."),
            decoder_layers=count("decoder.layers."),
            encoder_heads=state["encoder.layers.0.self_attn.c_attn"].numel(),
            decoder_heads=state["decoder.layers.0.self_attn.c_attn"].numel(),
            encoder_ffn_dim=state["encoder.layers.0.fc1.weight"].shape[0],
            decoder_ffn_dim=state["decoder.layers.0.fc1.weight"].shape[0],
            resnet_layers=stages,
            resnet_width=state["encoder.embed_images.conv1.weight"].shape[0],
            max_positions=state["encoder.embed_positions.weight"].shape[0] - 2,
            token_bucket_size=(state["encoder.token_rel_pos_table_list.0.weight"].shape[0] + 1) // 2,
            image_bucket_size=round(state["encoder.embed_image_positions.weight"].shape[0] ** 0.5),
            **fixed,
        )
    except KeyError as e:
        raise CheckpointError(f"not an OFA state dict: tensor {e.args[0]} is missing") from None


def _hf_to_config(raw: dict, where: Path) -> OFAConfig:
    required = {
        "normformer": True,
        "encoder_normalize_before": True,
        "decoder_normalize_before": True,
        "add_type_embedding": True,
        "share_decoder_input_output_embed": True,
        "entangle_position_embedding": False,
        "scale_embedding": False,
    }
    for key, value in required.items():
        if raw.get(key, value) != value:
            raise CheckpointError(
                f"{where}: {key}={raw[key]} is not supported (released OFA models use {value})"
            )
    resnet = raw.get("resnet_type", "resnet101")
    if resnet not in RESNET_LAYERS:
        raise CheckpointError(
            f"{where}: resnet_type {resnet!r} not supported; known: {sorted(RESNET_LAYERS)}"
        )
    return OFAConfig(
        vocab_size=raw["vocab_size"],
        d_model=raw["d_model"],
        encoder_layers=raw["encoder_layers"],
        decoder_layers=raw["decoder_layers"],
        encoder_heads=raw["encoder_attention_heads"],
        decoder_heads=raw["decoder_attention_heads"],
        encoder_ffn_dim=raw["encoder_ffn_dim"],
        decoder_ffn_dim=raw["decoder_ffn_dim"],
        resnet_layers=RESNET_LAYERS[resnet],
        max_positions=raw.get("max_position_embeddings", 1024),
        token_bucket_size=raw.get("token_bucket_size", 256),
        image_bucket_size=raw.get("image_bucket_size", 42),
        code_grid_size=raw.get("code_image_size", 128) // 8,
        dropout=raw.get("dropout", 0.1),
        attention_dropout=raw.get("attention_dropout", 0.0),
        activation_dropout=raw.get("activation_dropout", 0.0),
        encoder_drop_path_rate=raw.get("encoder_drop_path_rate", 0.0),
        decoder_drop_path_rate=raw.get("decoder_drop_path_rate", 0.0),
        resnet_drop_path_rate=raw.get("resnet_drop_path_rate", 0.0),
        patch_image_size=raw.get("patch_image_size", 480),
        # The HF-port releases are the pretrained models: plain bos-started decoding unless told otherwise.
        prompt_type=raw.get("prompt_type", "none"),
    )


def official_vocab(directory: Path | None, vocab_size: int) -> Vocab:
    """GPT-2 BPE vocabulary from `vocab.json` + `merges.txt`, or a text-less layout when they are absent."""
    num_codes, num_bins = (
        (OFA_NUM_CODES, OFA_NUM_BINS) if vocab_size > OFA_NUM_CODES + OFA_NUM_BINS else (0, 0)
    )
    if directory is not None and (directory / "vocab.json").exists() and (directory / "merges.txt").exists():
        vocab = Vocab.from_gpt2_bpe(directory / "vocab.json", directory / "merges.txt", num_codes, num_bins)
        if len(vocab) != vocab_size:
            raise CheckpointError(
                f"{directory}: tokenizer gives {len(vocab)} ids, the weights have {vocab_size}"
            )
        return vocab
    return Vocab.without_text(vocab_size - num_codes - num_bins - 1, num_codes, num_bins)


def _load_hf(path: Path, raw: dict) -> Loaded:
    config = _hf_to_config(raw, path / CONFIG)
    if (path / WEIGHTS).exists():
        state = load_file(str(path / WEIGHTS))
    elif (path / "pytorch_model.bin").exists():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"{path} has neither {WEIGHTS} nor pytorch_model.bin")
    model = OFAModel(config)
    load_state(model, state, source=str(path))
    return Loaded(model, official_vocab(path, config.vocab_size), "hf", {})


def fairseq_to_hf(key: str) -> str:
    for old, new in FAIRSEQ_TO_HF:
        key = key.replace(old, new)
    return key


def hf_to_fairseq(key: str) -> str:
    side = "encoder" if key.startswith("encoder.") else "decoder"
    attn_ln = ".attn_ln." if side == "encoder" else ".self_attn_ln."
    for old, new in (
        (".self_attn_mid_layer_norm.", attn_ln),
        (".cross_attn_mid_layer_norm.", ".cross_attn_ln."),
        (".ffn_layer_norm.", ".ffn_layernorm."),
        (".cross_attn_layer_norm.", ".encoder_attn_layer_norm."),
        (".cross_attn.", ".encoder_attn."),
    ):
        key = key.replace(old, new)
    return key


def _load_fairseq(path: Path) -> Loaded:
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a fairseq checkpoint (no 'model' entry)")
    state = {
        fairseq_to_hf(k): v
        for k, v in ckpt["model"].items()
        if k not in FAIRSEQ_DROP and not k.startswith("classification_heads.")
    }
    cfg = ckpt.get("cfg") or {}
    args = ckpt.get("args") or {}
    model_cfg = {
        **(args if isinstance(args, dict) else {}),
        **(cfg.get("model") or {} if isinstance(cfg, dict) else {}),
    }
    task_cfg = (cfg.get("task") or {}) if isinstance(cfg, dict) else {}
    fixed = {}
    size = task_cfg.get("patch_image_size") or model_cfg.get("patch_image_size")
    if isinstance(size, int):
        fixed["patch_image_size"] = size
    code_size = task_cfg.get("code_image_size") or model_cfg.get("code_image_size")
    if isinstance(code_size, int):
        fixed["code_grid_size"] = code_size // 8
    prompt = task_cfg.get("prompt_type") or model_cfg.get("prompt_type")
    fixed["prompt_type"] = "prev_output" if prompt == "prev_output" else "none"
    config = config_from_state(state, **fixed)
    model = OFAModel(config)
    load_state(model, state, source=str(path))
    return Loaded(model, official_vocab(path.parent, config.vocab_size), "fairseq", {"config": model_cfg})


# ---------------------------------------------------------------------------------------------
# Restricted unpickling of fairseq `.pt` files


class ConfigObject:
    """Stand-in for a config class from a pickle (argparse.Namespace, omegaconf, fairseq): data only."""

    qualname = "ConfigObject"

    def __new__(cls, *args, **kwargs):  # pickle may build it with __new__ alone (NEWOBJ, no state)
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state = args, dict(kwargs), None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):  # pickled dict subclasses fill items after construction
        self.kwargs[key] = value


CONFIG_MODULES = ("argparse", "omegaconf", "fairseq", "typing", "enum", "pathlib")
ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
}
SAFE_BUILTINS = {
    "set": set,
    "frozenset": frozenset,
    "slice": slice,
    "dict": dict,
    "list": list,
    "tuple": tuple,
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "bytes": bytes,
    "object": object,
    "complex": complex,
}


def _reconstruct(cls, base, state):
    """copyreg._reconstructor, but only for stand-in config classes."""
    if not (isinstance(cls, type) and issubclass(cls, ConfigObject)):
        raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r}")
    return cls.__new__(cls)


class _RestrictedUnpickler(pickle.Unpickler):
    stand_ins: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)  # protocol-2 names
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if module == "builtins" and name in SAFE_BUILTINS:
            return SAFE_BUILTINS[name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "copyreg" and name == "_reconstructor":
            return _reconstruct
        if module.split(".")[0] in CONFIG_MODULES:
            qual = f"{module}.{name}"
            if qual not in self.stand_ins:
                self.stand_ins[qual] = type(name, (ConfigObject,), {"qualname": qual})
            return self.stand_ins[qual]
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a checkpoint")


class _RestrictedPickle:
    """A `pickle_module` for `torch.load` whose Unpickler is restricted."""

    Unpickler = _RestrictedUnpickler
    load = staticmethod(lambda f, **kw: _RestrictedUnpickler(f, **kw).load())
    __name__ = "restricted_pickle"


def plain(obj):
    """Turn stand-in config objects (omegaconf nodes, Namespaces, enums) into dicts/lists/values."""
    if isinstance(obj, ConfigObject):
        state = obj.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        if isinstance(state, dict):
            if "_content" in state:
                return plain(state["_content"])
            if "_val" in state:
                return plain(state["_val"])
            return {k: plain(v) for k, v in state.items() if not k.startswith("_")}
        if obj.kwargs:
            return {k: plain(v) for k, v in obj.kwargs.items()}
        if obj.args:
            return plain(obj.args[0]) if len(obj.args) == 1 else [plain(a) for a in obj.args]
        return None
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def safe_torch_load(path: Path) -> dict:
    """torch.load a `.pt` without running code from it; config objects come back as plain data."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickle)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (zipfile.BadZipFile, EOFError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict at the top level, got {type(ckpt).__name__}")
    return {k: (v if k == "model" else plain(v)) for k, v in ckpt.items()}


# ---------------------------------------------------------------------------------------------
# Export to the HF-port layout


def hf_config(config: OFAConfig) -> dict:
    extras = [name for name in NON_OFA_MODULES if getattr(config, name)]
    extras += [name for name, ofa in OFA_SETTINGS.items() if getattr(config, name) != ofa]
    if extras:
        raise CheckpointError(
            f"{', '.join(extras)}: not part of OFA's architecture; the HF port cannot hold it"
        )
    resnet = next((n for n, layers in RESNET_LAYERS.items() if layers == tuple(config.resnet_layers)), None)
    if resnet is None or config.resnet_width != 64:
        raise CheckpointError(
            f"the HF port only knows ResNet-50/101/152 stems of width 64; this model has "
            f"stages {config.resnet_layers} of width {config.resnet_width}"
        )
    return {
        "model_type": "ofa",
        "architectures": ["OFAModel"],
        "vocab_size": config.vocab_size,
        "d_model": config.d_model,
        "encoder_layers": config.encoder_layers,
        "decoder_layers": config.decoder_layers,
        "encoder_attention_heads": config.encoder_heads,
        "decoder_attention_heads": config.decoder_heads,
        "encoder_ffn_dim": config.encoder_ffn_dim,
        "decoder_ffn_dim": config.decoder_ffn_dim,
        "resnet_type": resnet,
        "max_position_embeddings": config.max_positions,
        "token_bucket_size": config.token_bucket_size,
        "image_bucket_size": config.image_bucket_size,
        "code_image_size": config.code_grid_size * 8,
        "dropout": config.dropout,
        "attention_dropout": config.attention_dropout,
        "activation_dropout": config.activation_dropout,
        "encoder_drop_path_rate": config.encoder_drop_path_rate,
        "decoder_drop_path_rate": config.decoder_drop_path_rate,
        "resnet_drop_path_rate": config.resnet_drop_path_rate,
        "normformer": True,
        "attn_scale_factor": 2.0,
        "encoder_normalize_before": True,
        "decoder_normalize_before": True,
        "layernorm_embedding": True,
        "patch_layernorm_embedding": True,
        "code_layernorm_embedding": True,
        "add_type_embedding": True,
        "share_decoder_input_output_embed": True,
        "entangle_position_embedding": False,
        "scale_embedding": False,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "decoder_start_token_id": 0,
        "patch_image_size": config.patch_image_size,
        "prompt_type": config.prompt_type,
    }


def export_hf(model: OFAModel, vocab: Vocab, directory: str | Path) -> Path:
    """Write the HF-port layout (key names of OFA's `OFAModel.state_dict()`, tied copies included)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}
    embed = state["encoder.embed_tokens.weight"]
    for key in TIED:
        state[key] = embed.clone()
    for name, buf in model.named_buffers(remove_duplicate=False):
        state[name] = buf.detach().cpu().clone()
    save_file(state, str(directory / WEIGHTS))
    (directory / CONFIG).write_text(json.dumps(hf_config(model.config), indent=2) + "\n")
    vocab.save(directory)
    return directory
