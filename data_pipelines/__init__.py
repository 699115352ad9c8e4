"""Data pipeline: shards → documents → packed rows → batches (see each module's docstring).

    tokenizer.py  ByteTokenizer / HFTokenizer, load_tokenizer
    sequence.py   build_sequence: one document → ids, modality, images (the one layout rule)
    packing.py    RowPacker, collate_rows: the `cmoe_base.Batch` the model consumes
    shards.py     shard format, writer (+ CLI), decode_sample
    builtin.py    built-in PIL-drawn data (+ CLI)
    builtin_sizes.py  canvases of the built-in images: one square, or several sizes (--sizes)
    loader.py     DataConfig, StreamingLoader with exact resume
    errors.py     SkipCounter: bad input skipped and counted by reason

Import from the modules (`from data_pipelines.loader import StreamingLoader`): the package itself
imports none of its modules, so `python -m data_pipelines.shards` and `.builtin` run cleanly.
"""
import cmoe_base  # noqa: F401  first: its runtime defaults must precede torch (cmoe_base/runtime.py)
