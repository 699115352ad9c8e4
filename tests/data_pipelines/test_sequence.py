import torch

from data_pipelines.sequence import IGNORE_INDEX, build_sequence
from data_pipelines.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def test_markers_modality_and_images():
    img_a, img_b = torch.zeros(3, 8, 8), torch.ones(3, 8, 8)
    seq = build_sequence(["ab", img_a, "c", img_b], TOK, tokens_per_image=3)
    I = TOK.image_id
    assert seq.input_ids == [TOK.bos_id, 97, 98, TOK.img_start_id, I, I, I, TOK.img_end_id, 99,
                             TOK.img_start_id, I, I, I, TOK.img_end_id, TOK.eos_id]
    assert seq.modality == [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0]
    assert seq.images[0] is img_a and seq.images[1] is img_b
    assert seq.image_spans == [(3, 8), (9, 14)]
    assert sum(seq.modality) == 3 * len(seq.images)


def test_without_bos_eos():
    seq = build_sequence(["hi"], TOK, tokens_per_image=4, add_bos=False, add_eos=False)
    assert seq.input_ids == [104, 105] and seq.modality == [0, 0] and seq.images == []


def test_labels_skip_images_and_document_end():
    seq = build_sequence(["a", torch.zeros(3, 2, 2), "b"], TOK, tokens_per_image=2)
    # ids: bos a <s> I I <e> b eos
    assert seq.labels() == [97, TOK.img_start_id, IGNORE_INDEX, IGNORE_INDEX, TOK.img_end_id, 98, TOK.eos_id,
                            IGNORE_INDEX]
