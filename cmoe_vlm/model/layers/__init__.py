"""Building blocks shared by every part of the LM: norms, RoPE, attention, MoE, the block."""
