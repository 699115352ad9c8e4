"""Inference on a loaded model (docs/design.md §9).

    session.py     InferenceSession: a model with the per-stage decoding state of its rows
    generation.py  cached generation: greedy or sampled, stop ids, streaming, ragged batches
    runner.py      ModelRunner: an export with its tokenizer and image transform, for scoring and generation
"""
