"""The ``steerserve`` console script: serve, model prepare, train, vectors (SPEC §2, §9.2)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _env(option: str, default: Any = None) -> Any:
    """``STEERSERVE_<OPTION>`` from the environment, else ``default``."""
    return os.environ.get("STEERSERVE_" + option.upper().replace("-", "_"), default)


def _add_serve(sub: Any) -> None:
    from server.config import add_serve_options

    p = sub.add_parser(
        "serve",
        help="serve the HTTP API",
        description=(
            "Serve the steering API. Every option can also be set with an environment variable "
            "STEERSERVE_<OPTION> (e.g. STEERSERVE_PORT=9000); API keys come from STEERSERVE_API_KEY and "
            "STEERSERVE_ADMIN_KEY."
        ),
    )
    add_serve_options(p)


def _serve(args: argparse.Namespace) -> int:
    from server.config import config_from_args
    from server.serve import serve

    serve(config_from_args(args))
    return 0


def _prepare(_args: argparse.Namespace) -> int:
    from basemodel import prepare_default_model

    print(prepare_default_model())
    return 0


def _read_gguf(path: Path, num_layers: int | None = None, model: str | None = None) -> tuple[Any, bool]:
    """A control-vector GGUF as an artifact, and whether its layer count is known: from
    ``num_layers``, the model folder's ``config.json``, or the file itself (our exports record it)."""
    from steering_vectors.gguf_io import LayerCountUnknownError, import_gguf

    hidden = model_type = None
    if model is not None:
        cfg = json.loads((Path(model) / "config.json").read_text())
        num_layers = num_layers or cfg["num_hidden_layers"]
        hidden, model_type = cfg["hidden_size"], cfg.get("model_type")
    try:
        return import_gguf(path, num_layers=num_layers, hidden_size=hidden, model_type=model_type), True
    except LayerCountUnknownError as e:
        return import_gguf(path, num_layers=e.bound, hidden_size=hidden, model_type=model_type), False


def _layer_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1, name)


def _inspect(args: argparse.Namespace) -> int:
    import hashlib

    from steering_vectors import load_artifact

    path = Path(args.file)
    gguf = path.read_bytes()[:4] == b"GGUF"
    art, known = _read_gguf(path) if gguf else (load_artifact(path), True)
    norms = dict(sorted(art.norms().items(), key=lambda kv: _layer_order(kv[0])))
    report = {
        "file": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "kind": art.kind,
        "method": art.method,
        "model_type": art.model_type,
        "hidden_size": art.hidden_size,
        "num_layers": art.num_layers if known else None,
        "layers": art.layers,
        "lora_alpha": art.lora_alpha,
        "metadata": art.extra,
        "norms": norms,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if not known:
        report["num_layers"] = f"not recorded in the file (at least {art.num_layers})"
    for key in ("file", "sha256", "kind", "method", "model_type", "hidden_size", "num_layers"):
        print(f"{key:12} {report[key]}")
    if art.lora_alpha is not None:
        print(f"{'lora_alpha':12} {art.lora_alpha}")
    print(f"{'layers':12} {art.layers}")
    for k, v in art.extra.items():
        print(f"{'meta.' + k:12} {v if len(v) < 200 else v[:200] + '…'}")
    print("norms:")
    for name, n in norms.items():
        print(f"  {name:40} {n:.6g}")
    return 0


def _import_gguf(args: argparse.Namespace) -> int:
    from steering_vectors import save_artifact

    art, known = _read_gguf(Path(args.input), args.num_layers, args.model)
    if not known:
        raise ValueError(
            f"{args.input} does not record its model's layer count (controlvector.layer_count counts "
            f"its direction tensors); pass --num-layers N or --model DIR (at least {art.num_layers} layers)"
        )
    if args.model_type and args.model_type != art.model_type:
        art.model_type = args.model_type
    sha = save_artifact(art, args.output)
    print(f"wrote {args.output} (add, layers {art.layers}, {art.num_layers} model layers, sha256 {sha})")
    return 0


def _export_gguf(args: argparse.Namespace) -> int:
    from steering_vectors import export_gguf, load_artifact

    result = export_gguf(load_artifact(args.input), args.output, drop_layer0=args.drop_layer0)
    print(f"wrote {args.output} (layers {list(result.layers)}, sha256 {result.sha256})")
    if result.dropped:
        print(
            f"note: layers {list(result.dropped)} cannot be expressed in llama.cpp's numbering; dropped",
            file=sys.stderr,
        )
    return 0


def _layers(text: str) -> list[int]:
    """``"8-12,15"`` -> [8, 9, 10, 11, 12, 15]."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise argparse.ArgumentTypeError(
                f"invalid layers {text!r}: use numbers and ranges such as 8-12,15"
            )
        out += range(int(lo), int(hi or lo) + 1)
    return out


def _compute(args: argparse.Namespace) -> int:
    from basemodel import load_model
    from steering_vectors import save_artifact
    from steering_vectors.compute import compute_from_texts, read_pairs

    lm = load_model(args.model, quantization=args.quantization, dtype=args.dtype, device=args.device)
    texts = read_pairs(args.pairs, lm.tokenizer)
    extra = {"base_model": lm.model_id, **({"description": args.description} if args.description else {})}
    options = {k: getattr(args, k) for k in ("method", "layers", "batch_size", "max_tokens")}
    art = compute_from_texts(lm.model, lm.tokenizer, texts, **options, limit="--max-tokens", extra=extra)
    sha = save_artifact(art, args.out)
    rel = json.loads(art.extra["relative_norms"])
    print(
        f"wrote {args.out} (add, {args.method} from {len(texts)} pairs, layers {art.layers}, relative norms "
        f"{min(rel.values()):.4f}-{max(rel.values()):.4f}, sha256 {sha})"
    )
    return 0


def _import_peft(args: argparse.Namespace) -> int:
    from basemodel import model_skeleton
    from steering_vectors import save_artifact
    from steering_vectors.peft_io import import_peft

    art = import_peft(args.adapter_dir, model_skeleton(args.model))
    sha = save_artifact(art, args.output)
    modules = sorted({name.split(".", 2)[2].rsplit(".", 1)[0] for name in art.tensors})
    print(
        f"wrote {args.output} (lora, layers {art.layers}, modules {modules}, alpha {art.lora_alpha:g}, "
        f"sha256 {sha})"
    )
    return 0


def _upload(args: argparse.Namespace) -> int:
    import httpx

    key = args.admin_key or os.environ.get("STEERSERVE_ADMIN_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    path = Path(args.file)
    data = {"name": args.name, **({"description": args.description} if args.description else {})}
    base = args.url.rstrip("/")
    base = base[: -len("/v1")] if base.endswith("/v1") else base  # the OpenAI base URL works too
    try:
        with path.open("rb") as f:
            resp = httpx.post(
                base + "/v1/vectors",
                data=data,
                headers=headers,
                files={"file": (path.name, f, "application/octet-stream")},
                timeout=120,
            )
    except httpx.HTTPError as e:
        raise OSError(f"cannot reach the server at {base}: {e}") from None
    try:
        print(json.dumps(resp.json(), indent=2))
    except ValueError:
        print(f"HTTP {resp.status_code}: {resp.text[:500]}")
    return 0 if resp.status_code == 201 else 1


def _add_vector_makers(vec: Any) -> None:
    from basemodel import DTYPE_CHOICES, QUANTIZATION_CHOICES

    p = vec.add_parser(
        "compute",
        help="add vector from contrastive pairs (mean-diff or PCA of last-token hidden states)",
        description="Compute an add vector from contrastive pairs on a model's hidden states (repeng / CAA). "
        'PAIRS is JSONL: {"positive", "negative"} per line, or preference records {"prompt", "chosen", '
        '"rejected"} (chat-formatted prompt + reply).',
    )
    p.add_argument("--pairs", required=True, help="JSONL file of 2-1000 pairs")
    p.add_argument("--method", choices=("mean-diff", "pca"), default="mean-diff")
    p.add_argument("--out", required=True, help="the artifact (.safetensors)")
    p.add_argument(
        "--layers", type=_layers, default=None, help="e.g. 8-20 or 10,12,14 (default: middle half)"
    )
    p.add_argument("--model", default=None, help="local model directory (default: the embedded model)")
    p.add_argument("--quantization", choices=QUANTIZATION_CHOICES, default="none")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=16, help="texts per forward pass")
    p.add_argument("--max-tokens", type=int, default=1024, help="longest text, in tokens")
    p.add_argument("--description", default=None)
    p = vec.add_parser("import-peft", help="PEFT LoRA adapter directory -> lora artifact")
    p.add_argument("adapter_dir", help="holds adapter_config.json and adapter_model.safetensors")
    p.add_argument("output")
    p.add_argument("--model", default=None, help="the adapter's base model directory (default: embedded)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steerserve", description="Inference-time steering server.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    model = sub.add_parser("model", help="manage the default model").add_subparsers(
        dest="action", required=True
    )
    model.add_parser("prepare", help="provision the embedded default model offline; prints its path")
    train = sub.add_parser("train", help="offline RED / RAHF training")
    from training.cli import add_train_parser

    add_train_parser(train.add_subparsers(dest="method", required=True))
    vec = sub.add_parser("vectors", help="inspect, convert and upload artifacts").add_subparsers(
        dest="action", required=True
    )
    p = vec.add_parser("inspect", help="kind, layers, norms, metadata, sha256")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p = vec.add_parser("import-gguf", help="llama.cpp / repeng control vector -> add artifact")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--num-layers", type=int, default=None, help="layer count of the target model")
    p.add_argument("--model", default=None, help="the target model's folder (layer count, hidden size, type)")
    p.add_argument("--model-type", default=None, help="model_type to record (default: the file's hint)")
    p = vec.add_parser("export-gguf", help="add artifact -> llama.cpp control vector")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument(
        "--drop-layer0", action="store_true", help="drop a layer-0 direction (llama.cpp cannot apply it)"
    )
    _add_vector_makers(vec)
    p = vec.add_parser("upload", help="upload an artifact to a running server")
    p.add_argument("file")
    p.add_argument("--name", required=True)
    p.add_argument("--description", default=None)
    p.add_argument("--url", default=_env("url", "http://127.0.0.1:8000"))
    p.add_argument("--admin-key", default=None, help="default: $STEERSERVE_ADMIN_KEY")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    handlers = {
        ("serve", None): _serve,
        ("model", "prepare"): _prepare,
        ("vectors", "inspect"): _inspect,
        ("vectors", "import-gguf"): _import_gguf,
        ("vectors", "export-gguf"): _export_gguf,
        ("vectors", "compute"): _compute,
        ("vectors", "import-peft"): _import_peft,
        ("vectors", "upload"): _upload,
    }
    try:
        if args.command == "train":
            return int(args.run(args) or 0)
        return handlers[(args.command, getattr(args, "action", None))](args)
    except (ValueError, OSError, KeyError) as e:  # a user's mistake: one line, no traceback
        message = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
        print(f"steerserve: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
