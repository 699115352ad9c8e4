"""CLI: python -m cmoe_vlm.inspection --model DIR --data SPEC... --out DIR (see the package docstring)."""
from __future__ import annotations

import argparse
import sys

from cmoe_base.commands import Parser, command, fraction, non_negative_int, positive_int
from cmoe_base.outputs import check_output
from cmoe_vlm import inspection
from cmoe_vlm.inspection.image_content import REPEAT_TOLERANCE


@command("cmoe-inspect")
def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="cmoe-inspect", description=inspection.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder (config.json + model.safetensors)")
    ap.add_argument("--data", required=True, nargs="+", help="shard folders/patterns, 'builtin', or files")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--num-samples", type=positive_int, default=64, help="held-out samples to analyse (default 64)")
    ap.add_argument("--show", type=non_negative_int, default=4, help="samples rendered as HTML/terminal text (default 4)")
    ap.add_argument("--images", type=non_negative_int, default=6,
                    help="images drawn with their chunk maps, chosen over all samples: most compressed first, "
                         "then a spread of per-image ratios (default 6)")
    ap.add_argument("--repeat-tolerance", type=fraction, default=REPEAT_TOLERANCE,
                    help="an image token repeats its predecessor when their pixel cells differ by at most this "
                         f"mean absolute value of their block means in [0, 1] RGB (default {REPEAT_TOLERANCE})")
    ap.add_argument("--no-color", action="store_true", help="terminal view with | after boundaries instead of colours")
    ap.add_argument("--quiet", action="store_true", help="do not print the sample views on a terminal")
    args = ap.parse_args(argv)
    check_output(args.out, [args.model], whole=False)
    terminal = sys.stdout.isatty() and not args.quiet  # elsewhere the views are only in OUT/samples.txt
    from cmoe_vlm.inspection.report import inspect_model  # loads torch: after the arguments are parsed

    summary = inspect_model(args.model, args.data, args.out, args.num_samples, args.show, args.images,
                            terminal=terminal, color=not args.no_color, tolerance=args.repeat_tolerance)
    mods = summary["modalities"]
    for m in ("all", "text", "image"):
        if mods[m]["tokens"]:
            sp = mods[m]["ratio_per_sample"]
            print(f"{m:>5}: ratio {mods[m]['ratio']:.2f} (per sample {sp['mean']:.2f} ± {sp['std']:.2f}, "
                  f"{sp['min']:.2f}-{sp['max']:.2f}), mean p {mods[m]['mean_p']:.2f}, "
                  f"chunk length {mods[m]['chunk_length']['mean']:.2f}")
    img = mods["image"]
    if img.get("content"):
        c = img["content"]
        rates = [("n/a" if x["rate"] is None else f"{x['rate']:.0%}") for x in (c["changing"], c["repeating"])]
        print(f"image boundary rate on changing tokens {rates[0]} ({c['changing']['tokens']}), on repeating "
              f"tokens {rates[1]} ({c['repeating']['tokens']}); degenerate images {img['degenerate_fraction']:.0%} "
              f"of {img['images']}; within-image p std median {img['within_image_p_std']['median']:.3f}")
    print(f"tokens joining no concept (the other modality's tail before a switch): "
          f"{summary['tokens_left_out_before_modality_switch']}")
    print(f"wrote {args.out}/compression.json, samples.html, samples.txt and PNGs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
