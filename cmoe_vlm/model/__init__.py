"""The model: ConceptMoE and the VLM around it, plain `nn.Module`s that compute no loss (docs/design.md §1-§8).

    config.py         ModelConfig: the language model's shape
    layers/           norm, RoPE, attention (+ KV cache, document layouts), joint decoding, MoE, block
    chunk.py          ChunkModule: boundary probabilities p and boundaries b (+ its decoding state)
    boundaries.py     boundary policies: which boundaries the model uses (Learned, AllTokens, FixedStride, ...)
    merge.py          concepts from boundaries (sum, last)
    concept_model.py  ConceptModel: the middle of the network, on concepts
    dechunk.py        DechunkModule: EMA back to tokens, plug back
    conceptmoe.py     ConceptMoE: embed → encoder → chunk → merge → concept model → dechunk → decoder
    vlm.py            ConceptMoEVLM: vision tower + projector + ConceptMoE
"""
