"""Write a baseline export back in its transformers family's own format (docs/design.md §16; what is
written: cmoe_vlm/checkpoints/to_transformers.py). Arguments are parsed before torch is imported, so `--help` is
instant.

    python -m cmoe_vlm.cli.hf_export SRC --out DST [--family mixtral]    # also: cmoe-hf-export ...
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cmoe-hf-export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="export folder of a baseline MoE")
    ap.add_argument("--out", required=True, help="transformers folder to write")
    ap.add_argument("--family", default=None, help="mixtral, qwen2_moe, qwen3_moe or olmoe (default: the one the "
                                                   "export was imported from)")
    args = ap.parse_args(argv)
    from cmoe_base import ConfigError

    from ..checkpoints.families import Unsupported
    from ..checkpoints.tensor_files import TensorFileError
    from ..checkpoints.to_transformers import export_checkpoint

    try:
        family = export_checkpoint(args.src, args.out, args.family)
    except (Unsupported, TensorFileError, FileNotFoundError, ValueError, ConfigError) as e:
        print(f"error: {args.src}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: a {family} checkpoint (transformers AutoModelForCausalLM.from_pretrained loads it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
