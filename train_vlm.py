#!/usr/bin/env python
"""Train a ConceptMoE VLM: `cmoe_vlm/cli/train.py` (also the `cmoe-train` command), as a script that
`deepspeed` can launch.

    python train_vlm.py configs/tiny.yaml [key=value ...]           # one process (CPU or one GPU)
    deepspeed --num_gpus 2 train_vlm.py configs/tiny.yaml ...       # several processes / nodes
"""
import sys

from cmoe_vlm.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
