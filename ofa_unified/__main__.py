"""Command line: `python -m ofa_unified VERB`; verbs: sizes, predict, forward, convert, shapes, vocab."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ofa_unified.quantize import QUANTIZE_MODES

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "default"


def cmd_sizes(args: argparse.Namespace) -> None:
    from ofa_unified.model import build_model, list_models

    project_vocab = None
    if (args.checkpoint / "config.json").exists():
        project_vocab = json.loads((args.checkpoint / "config.json").read_text())["vocab_size"]
    rows = []
    for name in list_models():
        with torch.device("meta"):
            at_ofa = build_model(name, vocab_size=59457).num_parameters()
            row = {"name": name, "params_ofa_vocab": at_ofa}
            if project_vocab:
                row["params_project_vocab"] = build_model(name, vocab_size=project_vocab).num_parameters()
        rows.append(row)
    print(json.dumps({"ofa_vocab_size": 59457, "project_vocab_size": project_vocab, "sizes": rows}, indent=2))


def parse_box(text: str) -> list[float]:
    parts = text.split(",")
    if len(parts) != 4:
        raise SystemExit(f"--region needs x0,y0,x1,y1 (4 numbers), got {text!r}")
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise SystemExit(f"--region needs numbers, got {text!r}") from None


def cmd_predict(args: argparse.Namespace) -> None:
    from ofa_unified.data.preprocess import ImageError, load_image
    from ofa_unified.inference import Predictor, Request
    from ofa_unified.tasks import TEXT_FIELD
    from ofa_unified.vocab import TokenizerMissingError

    if (args.task is None) == (args.instruction is None):
        raise SystemExit("give --task NAME or --instruction TEXT (exactly one)")
    image = None
    if args.image is not None:
        try:
            image = load_image(args.image)
        except (ImageError, OSError) as e:
            raise SystemExit(f"cannot read image {args.image}: {e}") from None
    fields = dict(kv.split("=", 1) for kv in args.field)
    if args.text is not None:
        fields[TEXT_FIELD.get(args.task, "text")] = args.text
    if args.region is not None:
        fields["box"] = parse_box(args.region)
    options = {"beam_size": args.beam} if args.beam else {}
    if args.max_new_tokens:
        options["max_new_tokens"] = args.max_new_tokens
    if args.sample:
        options.update(
            do_sample=True, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature, seed=args.seed
        )
    if args.mean_image is not None:
        options["mean_image"] = args.mean_image
    candidates = [c.strip() for c in args.candidates.split(",")] if args.candidates else None
    predictor = Predictor.from_checkpoint(
        args.checkpoint, device=args.device, image_size=args.image_size, quantize=args.quantize
    )
    request = Request(image, args.task, fields, args.instruction, candidates, options)
    try:
        result = predictor.predict([request])[0]
    except (ValueError, TokenizerMissingError) as e:
        raise SystemExit(f"error: {e}") from None
    picture = result.pop("image", None)
    if picture is not None:
        out = Path(args.out_image or f"{args.task}.png")
        picture.save(out)
        result["image_path"] = str(out)
    print(json.dumps(result))


def cmd_forward(args: argparse.Namespace) -> None:
    from safetensors.torch import load_file, save_file

    from ofa_unified.checkpoint import load_checkpoint

    model = load_checkpoint(args.checkpoint, device=args.device).model
    inputs = load_file(str(args.inputs))
    missing = [k for k in ("patch_images", "input_ids", "decoder_input_ids") if k not in inputs]
    if missing:
        raise SystemExit(f"{args.inputs} lacks tensors {missing}")
    dev = lambda k: inputs[k].to(args.device) if k in inputs else None
    with torch.no_grad():
        logits, enc = model(
            dev("input_ids"), dev("decoder_input_ids"), dev("patch_images"), dev("patch_masks")
        )
    save_file(
        {"logits": logits.float().cpu().contiguous(), "encoder_out": enc.hidden.float().cpu().contiguous()},
        str(args.out),
    )
    print(
        json.dumps(
            {"out": str(args.out), "logits": list(logits.shape), "encoder_out": list(enc.hidden.shape)}
        )
    )


def cmd_convert(args: argparse.Namespace) -> None:
    from ofa_unified.checkpoint import export_hf, load_checkpoint, save_checkpoint
    from ofa_unified.vq import CONFIG_NAME as VQ_CONFIG
    from ofa_unified.vq import VQTokenizer

    loaded = load_checkpoint(args.src)
    if args.precise_bn:
        from ofa_unified.data.pipeline import image_batches
        from ofa_unified.resnet import precise_batchnorm

        size = loaded.model.config.patch_image_size
        precise_batchnorm(
            loaded.model.encoder.embed_images, image_batches(args.precise_bn_data, args.precise_bn, size)
        )
    if args.to == "hf":
        out = export_hf(loaded.model, loaded.vocab, args.out)
    else:
        out = save_checkpoint(
            loaded.model,
            loaded.vocab,
            args.out,
            extra={
                "converted_from": str(args.src),
                "source_format": loaded.format,
                **({"source_meta": loaded.meta} if loaded.meta else {}),
                **(
                    {"precise_bn": {"images": args.precise_bn, "data": args.precise_bn_data}}
                    if args.precise_bn
                    else {}
                ),
            },
            dtype=getattr(torch, args.dtype),
        )
        vq_dir = Path(args.src) / "vq"  # a bundled image tokenizer travels with the model
        if (vq_dir / VQ_CONFIG).is_file():
            VQTokenizer.load(vq_dir).save(Path(out) / "vq", dtype=getattr(torch, args.dtype))
    print(
        json.dumps(
            {"out": str(out), "from": loaded.format, "to": args.to, "params": loaded.model.num_parameters()}
        )
    )


def cmd_shapes(args: argparse.Namespace) -> None:
    from ofa_unified.data.shapes import write_split

    out = write_split(args.split, args.n, args.out, image_size=args.image_size)
    print(json.dumps({"out": str(out), "split": args.split, "n": args.n}))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["vocab"]:
        from ofa_unified.vocab import cli_train

        return cli_train(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m ofa_unified", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("sizes", help="JSON list of named sizes and their parameter counts")
    p.add_argument(
        "--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="gives the project vocabulary size"
    )
    p.set_defaults(func=cmd_sizes)

    p = sub.add_parser("predict", help="run one task (or a free instruction) on an image, print JSON")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--image", type=Path)
    p.add_argument("--task")
    p.add_argument("--instruction")
    p.add_argument("--text", help="the task's text (question for vqa, caption for text_to_image, ...)")
    p.add_argument("--region", help="x0,y0,x1,y1 in pixels of the image (x first)")
    p.add_argument("--field", action="append", default=[], metavar="KEY=VALUE", help="any other task field")
    p.add_argument("--candidates", help="comma-separated answers: trie-constrained decoding over them")
    p.add_argument("--beam", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--sample", action="store_true", help="sample instead of beam search")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--mean-image",
        action=argparse.BooleanOptionalAction,
        help="image tasks: average the decoded samples in pixel space (default: the task's setting)",
    )
    p.add_argument("--out-image", help="where image outputs go (default TASK.png)")
    p.add_argument(
        "--image-size", type=int, help="model input side (default: the checkpoint's patch_image_size)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--quantize", default="none", choices=QUANTIZE_MODES, help="int8: dynamically quantized linears (CPU)"
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("forward", help="run the model on saved tensors, write logits and encoder_out")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--inputs", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_forward)

    p = sub.add_parser("convert", help="convert any checkpoint format to the project's (or --to hf)")
    p.add_argument("src", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--to", choices=("own", "hf"), default="own")
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="storage type of floating tensors in the project format (float16 halves the size)",
    )
    p.add_argument(
        "--precise-bn",
        type=int,
        default=0,
        metavar="N",
        help="recompute the image stem's BatchNorm statistics over N images first (0: keep them)",
    )
    p.add_argument(
        "--precise-bn-data",
        default="shapes",
        metavar="SPEC",
        help="where those images come from: 'shapes' (train split) or a reader spec (jsonl:train.jsonl)",
    )
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("shapes", help="write shapes-world images and annotations")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--image-size", type=int, default=128)
    p.set_defaults(func=cmd_shapes)

    sub.add_parser("vocab", help="train a SentencePiece vocabulary (see `vocab --help`)")
    args = parser.parse_args(argv)
    from ofa_unified.checkpoint import CheckpointError

    try:
        args.func(args)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
