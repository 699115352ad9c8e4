"""Write a baseline export back in its transformers family's own format (docs/design.md §16; what is
written: cmoe_vlm/checkpoints/to_transformers.py). Arguments are parsed before torch is imported, so `--help` is
instant.

    python -m cmoe_vlm.cli.hf_export SRC --out DST [--family mixtral]    # also: cmoe-hf-export ...
"""
from __future__ import annotations

import argparse

from cmoe_base.commands import InputError, Parser, command
from cmoe_base.outputs import check_output


@command("cmoe-hf-export")
def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="cmoe-hf-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="export folder of a baseline MoE")
    ap.add_argument("--out", required=True, help="transformers folder to write (new or empty; see --replace)")
    ap.add_argument("--replace", action="store_true", help="replace a non-empty --out folder (whole, atomically)")
    ap.add_argument("--family", default=None, help="mixtral, qwen2_moe, qwen3_moe or olmoe (default: the one the "
                                                   "export was imported from)")
    args = ap.parse_args(argv)
    check_output(args.out, [args.src], args.replace)
    from ..checkpoints.to_transformers import export_checkpoint

    try:
        family = export_checkpoint(args.src, args.out, args.family)
    except ValueError as e:  # the export's errors (Unsupported, TensorFileError, ConfigError) name the part
        raise InputError(f"{args.src}: {e}") from None
    print(f"wrote {args.out}: a {family} checkpoint (transformers AutoModelForCausalLM.from_pretrained loads it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
