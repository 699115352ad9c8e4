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

Images: what the image chunker does with content. An image token *repeats* when its pixel cell is
near-identical to the cell the chunker scores it against (its raster predecessor; with 2d chunking
also the cell above), and *changes* otherwise (image_content.py states the rule and the tolerance);
the report gives the boundary rate on each, the share of degenerate images (one chunk, or every
token a boundary) and the within-image spread of p.

Outputs in --out:
    compression.json        per modality: tokens, boundaries, pooled ratio, per-sample ratio spread,
                            mean p, chunk lengths, boundary-probability histogram; for images also
                            per-image ratios (counted), degenerate images, within-image p spread,
                            boundary rates on changing vs repeating tokens, one record per image;
                            and the ratios the model itself reported (they must agree)
    samples.jsonl           per sample: modality and boundary masks, p, per-modality counts
    compression.png         per-sample text ratios, per-image image ratios (bars when discrete)
    chunk_lengths.png, boundary_probs.png
    samples.html            the report: the numbers above, the plots, the --images chosen images
                            (most compressed first, then a spread of ratios), then the first --show
                            samples: text with chunks highlighted and their images
    sample_<i>_image_<k>.png  image k of sample i: the image, its chunk map (colour and outline per
                            chunk, boundary tokens marked), p per token (colour bar), changing cells
    samples.txt             the --show samples as text, `|` after each boundary; printed (coloured)
                            instead when stdout is a terminal, unless --quiet
    sample_<i>.ansi.txt     the same text with ANSI colours per chunk (`cat` it in a terminal)

Rooms: samples.py (reading the data), image_content.py (changing vs repeating image tokens, from
pixels), analysis.py (running the model, counting chunks), render.py (terminal and HTML views),
plots.py (PNG figures), report.py (`inspect_model`, which writes everything), __main__.py (the CLI).
"""
