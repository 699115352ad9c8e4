"""Convert a trained baseline MoE into ConceptMoE for continual training (docs/design.md §11; the
method, its defaults and the lossless start: cmoe_vlm/checkpoints/conversion.py). Arguments are parsed before
torch is imported, so `--help` is instant.

    python -m cmoe_vlm.cli.convert --baseline runs/base/final --out runs/conv [--replace] [--encoder-layers 4] \\
        [--decoder-layers 4] [--strategy more_experts|looped|none] [--target-ratio 1.5] [--merge last]
"""
from __future__ import annotations

import argparse

from cmoe_base.commands import Parser, command, non_negative_int, positive_float, positive_int
from cmoe_base.outputs import check_output


@command("cmoe-convert")
def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="cmoe-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="exported baseline folder (save_pretrained, chunking off)")
    ap.add_argument("--out", required=True, help="folder for the converted export (new or empty; see --replace)")
    ap.add_argument("--replace", action="store_true", help="replace a non-empty --out folder (whole, atomically)")
    ap.add_argument("--encoder-layers", type=non_negative_int, default=4,
                    help="first N baseline layers -> encoder (default 4, the paper's)")
    ap.add_argument("--decoder-layers", type=non_negative_int, default=4,
                    help="last N baseline layers -> decoder (default 4, the paper's)")
    ap.add_argument("--strategy", default="more_experts",
                    help="compute reallocation matched in activated FLOPs: more_experts (default), looped or none")
    ap.add_argument("--target-ratio", type=positive_float, default=1.5, help="target compression R (default 1.5)")
    ap.add_argument("--merge", choices=("last", "sum"), default="last", help="concept merge (default last)")
    ap.add_argument("--joint-layers", type=non_negative_int, default=4,
                    help="zero-initialised joint decoding in the last N decoder layers (default 4, capped)")
    ap.add_argument("--match", choices=("concept", "model"), default="concept",
                    help="match the concept layers' activated FLOPs (paper's equations, default) or the whole model's")
    ap.add_argument("--seq-len", type=positive_int, default=None, help="sequence length for the attention-map column")
    args = ap.parse_args(argv)
    out = check_output(args.out, [args.baseline], args.replace)
    from .. import flops
    from ..checkpoints.conversion import convert, overrides_for
    from ..checkpoints.export import ID_KEYS, check_finite, load_pretrained, save_pretrained

    baseline, meta = load_pretrained(args.baseline)
    check_finite(baseline.state_dict(), args.baseline)
    converted, rows = convert(baseline, args.encoder_layers, args.decoder_layers, args.strategy,
                              args.target_ratio, args.merge, args.joint_layers, args.seq_len, args.match)
    print(f"R = {args.target_ratio:g}; FLOPs are forward, per token, attention map excluded")
    print(flops.format_table(rows))
    info = {"baseline": str(args.baseline), "encoder_layers": args.encoder_layers,
            "decoder_layers": args.decoder_layers, "strategy": args.strategy, "target_ratio": args.target_ratio,
            "merge": args.merge, "match": args.match, "flops": [r.summary() for r in rows]}
    kept = {k: meta[k] for k in ("parts", "tokenizer_vocab_size") if k in meta}  # an import's marks (training/init.py)
    tokenizer = meta.get("tokenizer", "byte")
    overrides = "\n".join(overrides_for(converted.cfg, meta.get("parts"))) + "\n"
    save_pretrained(converted, out, tokenizer, extra={"converted_from": info, **kept},
                    ids={k: meta[k] for k in ID_KEYS if k in meta} or None, files={"train_overrides.txt": overrides})
    data_tokenizer = f" data.tokenizer={out}" if tokenizer not in ("byte", None) else \
        " data.tokenizer=TOKENIZER" if tokenizer is None else ""
    print(f"wrote {out} (continue with: train_vlm.py CONFIG $(cat {out}/train_overrides.txt) "
          f"train.init_from={out}{data_tokenizer} train.ratio_ramp_steps=N)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
