"""Weights on disk: our export folder and conversions between formats (docs/design.md §11, §15, §16).

    export.py             the export folder: config.json + model.safetensors + tokenizer (save/load_pretrained)
    tensor_files.py       safetensors read and written one tensor at a time
    remote_code.py        what an export adds for transformers: processor config, trust_remote_code bundle
    families.py           transformers MoE families (Mixtral, Qwen2/3-MoE, OLMoE) as our layers, both ways
    from_transformers.py  import a transformers MoE checkpoint as a baseline export
    to_transformers.py    export a baseline back in its family's format
    conversion.py         a baseline MoE export → ConceptMoE (layer re-split, reallocation)
"""
