"""Import a pretrained Hugging Face MoE language model as a cmoe-vlm baseline (docs/design.md §16; what
the export holds and what is refused: cmoe_vlm/checkpoints/from_transformers.py). Arguments are parsed before torch is
imported, so `--help` is instant.

    python -m cmoe_vlm.cli.hf_import SRC --out DST          # also: cmoe-hf-import SRC --out DST
"""
from __future__ import annotations

import argparse

from cmoe_base.commands import InputError, Parser, command
from cmoe_base.outputs import check_output


@command("cmoe-hf-import")
def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="cmoe-hf-import", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="local transformers model folder (config.json + safetensors [+ tokenizer])")
    ap.add_argument("--out", required=True, help="export folder to write (new or empty; see --replace)")
    ap.add_argument("--replace", action="store_true", help="replace a non-empty --out folder (whole, atomically)")
    args = ap.parse_args(argv)
    check_output(args.out, [args.src], args.replace)
    from ..checkpoints.from_transformers import import_checkpoint

    try:
        report = import_checkpoint(args.src, args.out)
    except ValueError as e:  # the checkpoint's errors (Unsupported, TensorFileError, ConfigError) name the part
        raise InputError(f"{args.src}: {e}") from None
    mib = 2 ** 20
    print(f"imported {report.family}: {report.layers} layers, {report.params / 1e6:.1f}M parameters, "
          f"{report.checkpoint_bytes / mib:.1f} MiB read in {report.seconds:.1f} s; peak RSS "
          f"{report.peak_rss_bytes / mib:.0f} MiB ({report.peak_rss_bytes / max(report.checkpoint_bytes, 1):.2f}x "
          f"the checkpoint)")
    print(f"wrote {args.out}: a baseline MoE (chunking off). Next: python -m cmoe_vlm.cli.convert --baseline {args.out} "
          f"--out CONVERTED (docs/design.md §16)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
