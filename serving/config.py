"""Server settings: one dataclass, overridable by `OFA_SERVE_*` environment variables and by flags.

Precedence: command-line flag > environment variable > default. Every limit the server enforces is a
field here, and error messages name the field (and its variable) so a client knows what to change.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

ENV_PREFIX = "OFA_SERVE_"


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class ServeConfig:
    """Everything `python -m serving` and `build_app` need; see `--help` for each field."""

    checkpoint: str = _opt("checkpoints/default", "checkpoint directory (own, HF-port or fairseq)")
    device: str = _opt("auto", "torch device; 'auto' = cuda if available (and quantize is 'none'), else cpu")
    quantize: str = _opt(
        "none", "'int8': dynamically quantized int8 linears, CPU only (speed and accuracy: bench/README.md)"
    )
    host: str = _opt("127.0.0.1", "bind address (0.0.0.0 inside a container)")
    port: int = _opt(8000, "TCP port")
    log_level: str = _opt("info", "log level of the JSON logs")
    # Dynamic batching
    max_batch_size: int = _opt(8, "most requests run as one Predictor.predict call (1 = batching off)")
    batch_window_ms: float = _opt(5.0, "how long the first request of a batch waits for company")
    continuous_batching: bool = _opt(
        True,
        "requests join the running batch between decoding steps and leave when done (off: a batch "
        "is formed once and runs to its end)",
    )
    max_queue_depth: int = _opt(64, "requests waiting for the model beyond this get 503")
    request_timeout_s: float = _opt(30.0, "a request not answered within this gets 504")
    retry_after_s: int = _opt(1, "Retry-After seconds sent with 503")
    shutdown_timeout_s: float = _opt(30.0, "on shutdown, how long queued requests may take to finish")
    warmup: bool = _opt(True, "run one request before reporting ready")
    # Input limits
    max_upload_bytes: int = _opt(10 * 1024 * 1024, "largest encoded image accepted (413 above)")
    max_image_pixels: int = _opt(25_000_000, "largest decoded image, width*height (413 above)")
    max_instruction_chars: int = _opt(1000, "longest instruction or text field, in characters")
    max_instruction_tokens: int = _opt(256, "longest encoder source, in tokens")
    max_new_tokens: int = _opt(256, "largest max_new_tokens a request may ask for")
    max_beam_size: int = _opt(8, "largest beam_size a request may ask for")
    max_candidates: int = _opt(100, "most candidate answers in one request")
    max_retrieval_texts: int = _opt(1000, "most candidate texts in one /v1/retrieval request")
    max_retrieval_images: int = _opt(64, "most candidate images in one /v1/retrieval request")
    max_rerank: int = _opt(50, "largest rerank (ITM re-scored candidates) a retrieval may ask for")
    # OpenAI-compatible chat API
    model_name: str = _opt(
        "", "model id in /v1/models and chat requests; '' = the checkpoint's directory name"
    )
    fetch_image_urls: bool = _opt(
        False,
        "fetch http(s) image_url images in chat requests (off: only data: URIs; the server makes "
        "requests to whatever hosts clients name)",
    )
    image_fetch_timeout_s: float = _opt(10.0, "a fetched image_url must arrive whole within this")

    def __post_init__(self) -> None:
        positive = (
            "port",
            "max_batch_size",
            "max_upload_bytes",
            "max_image_pixels",
            "max_instruction_chars",
            "max_instruction_tokens",
            "max_new_tokens",
            "max_beam_size",
            "max_candidates",
            "max_retrieval_texts",
            "max_retrieval_images",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "batch_window_ms",
            "max_queue_depth",
            "retry_after_s",
            "shutdown_timeout_s",
            "max_rerank",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("request_timeout_s", "image_fetch_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        from ofa_unified.quantize import check_quantize

        check_quantize(self.quantize)

    @staticmethod
    def env_name(name: str) -> str:
        return ENV_PREFIX + name.upper()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServeConfig:
        """Defaults, then `OFA_SERVE_*` variables, then `overrides`."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(cls.env_name(f.name))
            if raw is not None:
                try:
                    values[f.name] = _parse(f.type, raw)
                except ValueError:
                    raise ValueError(f"{cls.env_name(f.name)}={raw!r} is not a valid {f.type}") from None
        return cls(**{**values, **overrides})

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, base: ServeConfig) -> None:
        """One `--flag` per field, defaulting to `base` (so the environment shows through)."""
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            default = getattr(base, f.name)
            help_text = f"{f.metadata['help']} (env {cls.env_name(f.name)}; default {default!r})"
            if f.type == "bool":
                parser.add_argument(
                    flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
                )
            else:
                parser.add_argument(flag, type=_TYPES[f.type], default=default, help=help_text)

    @classmethod
    def from_args(
        cls, argv: list[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> ServeConfig:
        parser = argparse.ArgumentParser(
            prog="python -m serving", description="Serve an ofa-unified checkpoint over HTTP (uvicorn)."
        )
        cls.add_arguments(parser, cls.from_env(environ))
        return cls(**vars(parser.parse_args(argv)))


_TYPES = {"int": int, "float": float, "str": str}


def _parse(type_name: str, raw: str) -> Any:
    """Parse a flag or variable by the field's (string) annotation."""
    if type_name == "bool":
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    return _TYPES[type_name](raw)


def resolve_device(device: str, cpu_only: bool = False) -> str:
    """'auto' -> 'cuda' when a GPU is visible and the model may use it (not `cpu_only`: an int8
    model), else 'cpu'; anything else unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() and not cpu_only else "cpu"
