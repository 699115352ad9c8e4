"""The ImageStride boundary policy (cmoe_vlm/model/boundaries.py): fixed-stride chunking of images with
the learned chunker's boundaries on text, as the model and a ModelRunner use it."""
from pathlib import Path

import pytest
import torch

from cmoe_base import Modality
from cmoe_vlm.model.boundaries import ImageStride
from cmoe_vlm.model.chunk import Boundaries, forced_boundaries

ROOT = Path(__file__).resolve().parents[2]


def test_image_stride_closes_groups_counted_from_each_image_start_and_leaves_text_alone():
    T, I = int(Modality.TEXT), int(Modality.IMAGE)
    modality = torch.tensor([[T, T, I, I, I, I, I, T, I, I, I, T],
                             [I, I, I, T, T, T, T, T, T, T, T, T]])  # row 1: a span that opens with an image
    starts = torch.zeros(2, 12, dtype=torch.bool)
    starts[:, 0] = True
    forced = forced_boundaries(starts, modality)  # document starts, the last token of each modality run
    assert forced[0].nonzero().flatten().tolist() == [0, 1, 6, 7, 10] and forced[1].nonzero().flatten().tolist() == [0, 2]
    text_b = torch.zeros(2, 12, dtype=torch.bool)
    text_b[0, 1] = text_b[1, 5] = True  # the chunker's own text boundaries
    own = Boundaries(p=torch.rand(2, 12), b=text_b | forced, forced=forced)
    own.b[0, 3] = True  # an image boundary of the chunker's: the policy replaces it
    pos, valid = torch.arange(12).expand(2, 12), torch.ones(2, 12, dtype=torch.bool)
    two = ImageStride(2)(own, pos, valid, modality)
    # groups of 2 closed at the 2nd, 4th, ... image token, the image's last token closing the rest
    assert two.b[0].nonzero().flatten().tolist() == [0, 1, 3, 5, 6, 7, 9, 10]
    assert two.b[1].nonzero().flatten().tolist() == [0, 1, 2, 5]
    assert torch.equal(two.p, own.p) and torch.equal(two.forced, forced)
    one = ImageStride(1)(own, pos, valid, modality)
    assert one.b[modality == I].all() and torch.equal(one.b[modality == T], own.b[modality == T])
    step = Boundaries(p=own.p[:, 4], b=own.b[:, 4], forced=forced[:, 4])  # a decoding step: (B,)
    assert ImageStride(2)(step, pos[:, 4], valid[:, 4], modality[:, 4] * 0) is step
    with pytest.raises(ValueError, match="decoding step holds an image token"):
        ImageStride(2)(step, pos[:, 4], valid[:, 4], modality[:, 4])
    with pytest.raises(ValueError, match="needs the modality"):
        ImageStride(2)(own, pos, valid)
    with pytest.raises(ValueError, match="integer >= 1"):
        ImageStride(1.5)


def test_a_runner_scores_with_its_policy():
    """A ModelRunner given ImageStride(4) uses it in every scoring forward: 4 concepts per image of
    16 tokens, text chunked as without the policy."""
    from cmoe_vlm.inference.runner import ModelRunner
    from cmoe_vlm.training.config import load_experiment
    from cmoe_vlm.model.vlm import ConceptMoEVLM
    from data_pipelines.tokenizer import ByteTokenizer

    exp = load_experiment(ROOT / "configs/tiny.yaml", ["model.dim=32", "model.moe.expert_hidden=32", "vision.depth=1"])
    torch.manual_seed(0)
    model = ConceptMoEVLM(exp.vlm)
    plain, strided = ModelRunner(model, ByteTokenizer()), ModelRunner(model, ByteTokenizer(), boundaries=ImageStride(4))
    seqs = [plain.sequence(["Look:", torch.randn(3, 64, 64), "two", torch.randn(3, 64, 64), "circles."])]
    (ref, _), (out, batch) = plain.forward(seqs), strided.forward(seqs)
    image = batch.modality == Modality.IMAGE
    assert int(image.sum()) == 32 and int(out.boundaries[image].sum()) == 8
    assert torch.equal(out.boundaries[~image], ref.boundaries[~image])
