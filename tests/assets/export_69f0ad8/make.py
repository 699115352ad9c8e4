"""How this asset was made: an export written by main at commit 69f0ad8 (before the package layout of
issue #25), with the logits that commit's code computed on one input. It runs against THAT commit's
modules (their import paths are gone since):

    git worktree add --detach /tmp/old 69f0ad8
    cd /tmp/old && PYTHONPATH=/tmp/old python <this file> <this folder>

tests/cmoe_vlm/test_old_export.py loads `model/` with today's code and checks the logits.
The model is tiny (byte tokenizer, dim 16, one layer per stage, a one-block ViT on 32-pixel images)
and trained with the ratio controller on (`chunk.ratio_integral`), so its weights hold the `lm.ratio_mu`
buffer that exports of that time carried.
"""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from cmoe_vlm.chunking import ChunkConfig
from cmoe_vlm.export import save_pretrained
from cmoe_vlm.layers.moe import MoEConfig
from cmoe_vlm.model import ModelConfig
from cmoe_vlm.vlm import ConceptMoEVLM, VLMConfig
from vision import ProjectorConfig, VisionConfig

out = Path(sys.argv[1])
torch.manual_seed(0)
cfg = VLMConfig(
    model=ModelConfig(dim=16, num_heads=2, encoder_layers=1, concept_layers=1, decoder_layers=1,
                      moe=MoEConfig(num_experts=2, top_k=1, expert_hidden=16),
                      chunk=ChunkConfig(ratio_integral=0.01, ratio_loss_weight=1.0)),
    vision=VisionConfig(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, crop_pct=1.0),
    projector=ProjectorConfig(reduction=2))  # 4 tokens per image
model = ConceptMoEVLM(cfg)
with torch.no_grad():
    model.lm.ratio_mu.copy_(torch.tensor([0.25]))  # a controller state that is not the initial zero
model.eval()
save_pretrained(model, out / "model")

import cmoe_vlm.hf  # noqa: E402,F401
from transformers import AutoModelForCausalLM  # noqa: E402

hf = AutoModelForCausalLM.from_pretrained(out / "model").eval()
g = torch.Generator().manual_seed(1)
text = torch.randint(0, 256, (2, 12), generator=g)
ids = torch.cat([text[:, :5], torch.full((2, 1), 259), torch.full((2, 4), 261), torch.full((2, 1), 260), text[:, 5:]], 1)
image_positions = (ids == 261).long()
pixels = torch.randn(2, 3, 32, 32, generator=g)
text_ids = torch.randint(0, 256, (2, 20), generator=g)
with torch.no_grad():
    logits = hf(input_ids=ids, mm_token_type_ids=image_positions, pixel_values=pixels).logits
    text_logits = hf(input_ids=text_ids).logits
save_file({"input_ids": ids, "mm_token_type_ids": image_positions, "pixel_values": pixels, "logits": logits,
           "text_input_ids": text_ids, "text_logits": text_logits}, str(out / "expected.safetensors"))
print(f"wrote {out}: logits {tuple(logits.shape)}")
