"""Training glue: experiment config, DeepSpeed engine, optimizer/schedule, logging, checkpoints.

The model stays plain `nn.Module`s; everything DeepSpeed-specific lives here.
"""
