"""Train a ConceptMoE VLM (the `cmoe-train` command; `train_vlm.py` in the repo root runs the same).

    cmoe-train configs/tiny.yaml [key=value ...]                    # one process (CPU or one GPU)
    python train_vlm.py configs/tiny.yaml [key=value ...]           # the same
    deepspeed --num_gpus 2 train_vlm.py configs/tiny.yaml ...       # several processes / nodes

Overrides use dotted keys, e.g. `train.steps=50 model.chunk.target_ratio=3 data.batch_size=4`.
`--builtin` first writes the built-in synthetic dataset to the paths named by data.shards and
train.heldout_shards (when missing), on the canvases data.builtin_sizes names (null: image_size squares). Arguments are parsed before torch is imported, so `--help`
is instant.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cmoe_base.commands import Parser, command


@command("cmoe-train")
def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="cmoe-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="experiment YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument("--builtin", action="store_true", help="generate the built-in dataset if it is missing")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    args = parser.parse_intermixed_args(argv)

    from cmoe_vlm.config import ConfigError
    from cmoe_vlm.training.config import load_experiment

    try:
        exp = load_experiment(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.builtin:
        from data_pipelines.builtin import write_builtin_dataset
        root = Path(exp.data.shards).parent
        if not all((root / split / "manifest.json").exists() for split in ("train", "heldout")):
            write_builtin_dataset(root, image_size=exp.data.image_size, sizes=exp.data.builtin_sizes)

    from cmoe_vlm.checkpoints.export import NonFiniteWeightsError
    from cmoe_vlm.training.checkpoint import CheckpointError
    from cmoe_vlm.training.engine import shutdown_distributed
    from cmoe_vlm.training.loop import NonFiniteError, train
    try:
        summary = train(exp)
    except ConfigError as e:  # checks that need the files or the number of processes, before anything is built
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteError, NonFiniteWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    shutdown_distributed()
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
