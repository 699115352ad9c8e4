"""Import a pretrained Hugging Face MoE language model as a cmoe-vlm baseline (docs/design.md §16; what
the export holds and what is refused: cmoe_vlm/checkpoints/from_transformers.py). Arguments are parsed before torch is
imported, so `--help` is instant.

    python -m cmoe_vlm.cli.hf_import SRC --out DST          # also: cmoe-hf-import SRC --out DST
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cmoe-hf-import", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="local transformers model folder (config.json + safetensors [+ tokenizer])")
    ap.add_argument("--out", required=True, help="export folder to write")
    args = ap.parse_args(argv)
    from cmoe_base import ConfigError

    from ..checkpoints.families import Unsupported
    from ..checkpoints.from_transformers import import_checkpoint
    from ..checkpoints.tensor_files import TensorFileError

    try:
        report = import_checkpoint(args.src, args.out)
    except (Unsupported, TensorFileError, FileNotFoundError, ConfigError) as e:
        print(f"error: {args.src}: {e}", file=sys.stderr)
        return 2
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
