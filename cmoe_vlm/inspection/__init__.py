"""How did a checkpoint chunk its inputs? Compression per modality, chunk lengths, boundary
probabilities, and single samples with their chunks drawn.

    python -m cmoe_vlm.inspection --model runs/tiny/final --data data/builtin/heldout --out inspect/
    python -m cmoe_vlm.inspection --model DIR --data builtin --out DIR         # regenerated held-out split
    python -m cmoe_vlm.inspection --model DIR --data a.png b.txt docs.jsonl --out DIR

Data: shard folders or tar patterns (as data.shards), `builtin` (the built-in held-out split,
regenerated), or files: images (one image each), .txt (one text each), .jsonl (lines of
{"pieces": [{"text"}|{"image": path}]}, {"image", "text"} or {"text"}; paths relative to the file).
Each sample is laid out as in training (bos ... eos) and run alone through the model in eval mode,
where boundaries are deterministic (p ≥ 0.5).

What is a chunk. The chunk module marks boundary tokens; a boundary token *closes* its chunk, which
holds the tokens after the previous boundary up to and including it (docs/design.md §2). The first token of a
document and (by default) the first token after a modality switch are forced boundaries (p = 1).
Tokens after the last boundary belong to no chunk yet ("open" tail). The compression ratio of a
modality is its tokens / the boundaries among them (what training logs as ratio_text/ratio_image).

Outputs in --out:
    compression.json        per modality: tokens, boundaries, pooled ratio, per-sample ratio spread,
                            mean p, chunk lengths, boundary-probability histogram, image extremes;
                            and the ratios the model itself reported (they must agree)
    samples.jsonl           per sample: modality and boundary masks, p, per-modality counts
    compression.png, chunk_lengths.png, boundary_probs.png
    samples.html            the first --show samples: text with chunks highlighted, image chunk maps
    sample_<i>.ansi.txt     the same text for a terminal (`cat` it); printed unless --quiet
    sample_<i>_image_<k>.png  image with its patch-level chunk map

Rooms: samples.py (reading the data), analysis.py (running the model, counting chunks),
render.py (terminal and HTML text views), plots.py (PNG figures), report.py (`inspect_model`,
which writes everything), __main__.py (the CLI).
"""
