"""Training stages: train.freeze and train.lr_scale (cmoe_vlm/training/stages.py)."""
import pytest
import torch

from cmoe_vlm.config import ConfigError
from cmoe_vlm.training.config import load_experiment
from cmoe_vlm.training.optim import apply_hyperparameters, build_optimizer
from cmoe_vlm.training.resume import compare, experiment_record
from cmoe_vlm.training.stages import apply_freeze
from cmoe_vlm.model.vlm import ConceptMoEVLM
from cmoe_vlm.objective import Objective
from data_pipelines.packing import collate_rows, Row
from data_pipelines.sequence import build_sequence
from data_pipelines.tokenizer import ByteTokenizer

from .conftest import TINY_OVERRIDES


def experiment(*extra):
    return load_experiment("configs/tiny.yaml", [*TINY_OVERRIDES, "train.warmup_steps=0", *extra])


def a_batch(exp):
    tok, n = ByteTokenizer(), exp.data.tokens_per_image
    img = torch.rand(3, exp.data.image_size, exp.data.image_size)
    seq = build_sequence([img, "Question: what colour? Answer:", " red"], tok, n)
    row = Row()
    row.add(seq, 0, len(seq))
    return collate_rows([row.pad_to(64, tok.pad_id)], (3, exp.data.image_size, exp.data.image_size))


def test_frozen_components_do_not_train_and_scaled_ones_get_their_rate():
    exp = experiment("train.freeze=[vision, embed, encoder, chunk, concept, decoder]", "train.lr_scale={projector: 4}")
    torch.manual_seed(0)
    model = ConceptMoEVLM(exp.vlm)
    frozen = apply_freeze(model, exp.train.freeze)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert frozen > 0 and trainable and all(n.startswith("projector.") for n in trainable)
    opt, sched = build_optimizer(model, exp.train)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for n, p in model.named_parameters() if n in trainable}
    assert {g["lr"] for g in opt.param_groups if g["params"]} == {exp.train.lr * 4}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        batch = a_batch(exp)
        opt.zero_grad()
        Objective(exp.model)(model(batch), batch).total.backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_lr_scales_multiply_and_a_resume_applies_new_values():
    exp = experiment("train.lr_scale={experts: 0.5, decoder: 3}")
    model = ConceptMoEVLM(exp.vlm)
    opt, sched = build_optimizer(model, exp.train)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["decay:decoder:experts"]["lr"] == pytest.approx(exp.train.lr * 1.5)
    assert by_name["decay:experts"]["lr"] == pytest.approx(exp.train.lr * 0.5)
    assert by_name["decay"]["lr"] == pytest.approx(exp.train.lr)
    apply_hyperparameters(sched, experiment("train.lr_scale={experts: 0.5, decoder: 1}").train)
    assert {g["name"]: g["lr"] for g in opt.param_groups}["decay:decoder:experts"] == pytest.approx(exp.train.lr * 0.5)


def test_resume_refuses_a_changed_freeze_or_scaled_set_and_applies_new_scale_values():
    def diff(a, b):
        return compare(experiment_record(experiment(*a), 1), experiment_record(experiment(*b), 1))

    assert "train.freeze" in diff([], ["train.freeze=[vision]"])["refused"]
    assert diff(["train.lr_scale={chunk: 2}"], ["train.lr_scale={chunk: 3}"])["applied"] == {
        "train.lr_scale.chunk": [2, 3]}
    assert "train.lr_scale.vision" in diff(["train.lr_scale={chunk: 2}"], ["train.lr_scale={chunk: 2, vision: 0.1}"])[
        "refused"]


@pytest.mark.parametrize("override, match", [("train.freeze=[visual]", "train.freeze = 'visual'"),
                                             ("train.lr_scale={vision: -1}", "lr_scale.vision"),
                                             ("train.lr_scale={lm: 2}", "lr_scale = 'lm'")])
def test_bad_stage_fields_name_the_field(override, match):
    with pytest.raises(ConfigError, match=match):
        experiment(override)
