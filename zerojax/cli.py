"""The `zerojax` command. Bad input exits 2 with one line on stderr (a traceback only with --debug)."""
from __future__ import annotations

import argparse
import sys

from zerojax.config import ConfigError
from zerojax.errors import CheckpointError

USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, ValueError)


def _export(args: argparse.Namespace) -> int:
    if args.hf:
        from zerojax.hf import export_checkpoint_to_hf
        out = export_checkpoint_to_hf(args.checkpoint, args.out, tag=args.tag, dtype=args.dtype)
    else:
        from zerojax.checkpoint import export_safetensors
        out = export_safetensors(args.checkpoint, args.out, tag=args.tag, dtype=args.dtype)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zerojax", description="DeepSpeed-style training on JAX.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser(
        "export", help="consolidated weights of a checkpoint as safetensors (zero_to_fp32's job)")
    export.add_argument("checkpoint", help="checkpoint directory (the one holding 'latest')")
    export.add_argument("out", help="output .safetensors file, or a directory with --hf")
    export.add_argument("--tag", help="checkpoint tag (default: what 'latest' names)")
    export.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    export.add_argument("--hf", action="store_true",
                        help="write a Hugging Face model directory (config.json + safetensors)")
    export.set_defaults(run=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"zerojax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
