"""Faults a run must survive (README "What a run survives"): hostile checkpoints, non-finite steps under
gradient accumulation and on one rank of two, resumes with a changed config, a full disk, bad configs,
an empty held-out set, non-finite weights at export."""
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cmoe_base import Batch
from cmoe_vlm.config import ConfigError
from cmoe_vlm.checkpoints.export import NonFiniteWeightsError, load_pretrained, save_pretrained
from cmoe_vlm.training import loop
from cmoe_vlm.training.checkpoint import CheckpointError, export_checkpoint, load_deepspeed_file
from cmoe_vlm.training.config import load_experiment
from cmoe_vlm.model.vlm import ConceptMoEVLM, VLMConfig

from .conftest import NaNGradient, overrides
from .test_train import ROOT, checkpoints, read_metrics

FAST = ["data.num_workers=0", "train.heldout_shards="]


def experiment(data, out: Path, *extra: str):
    return load_experiment(ROOT / "configs/tiny.yaml", overrides(data, out, *FAST, *extra))


def capture_engines(monkeypatch) -> list:
    engines = []
    real = loop.build_engine

    def build(*args, **kwargs):
        result = real(*args, **kwargs)
        engines.append(result[0])
        return result

    monkeypatch.setattr(loop, "build_engine", build)
    return engines


def inject(monkeypatch, faults: dict[int, str]) -> None:
    """Training forward number n (from 1) gets faults[n]: 'nan_loss' or 'nan_grad'."""
    real = ConceptMoEVLM.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            fault = faults.get(calls["n"])
            if fault == "nan_loss":
                out.logits = out.logits * float("nan")
            elif fault == "nan_grad":
                out.logits = NaNGradient.apply(out.logits)
        return out

    monkeypatch.setattr(ConceptMoEVLM, "forward", forward)


def forbid_building(monkeypatch) -> None:
    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was built before the error")

    monkeypatch.setattr(ConceptMoEVLM, "__init__", refuse)


# ----------------------------------------------------------------------------- non-finite steps

@pytest.mark.parametrize("zero_stage", [0, 2])
def test_nonfinite_micro_batch_skips_its_whole_accumulation_group(builtin_data, tmp_path, monkeypatch, zero_stage):
    """grad_accum 2: a NaN loss in the second micro-batch of a group, a NaN gradient in the first of
    another: both groups are skipped whole and DeepSpeed's micro-steps stay in phase."""
    inject(monkeypatch, {4: "nan_loss", 7: "nan_grad"})  # groups (1,2) (3,4) (5,6) (7,8) (9,10) (11,12)
    engines = capture_engines(monkeypatch)
    summary = loop.train(experiment(builtin_data, tmp_path / "ga", "train.steps=4", "train.grad_accum=2",
                                    f"train.zero_stage={zero_stage}"))
    engine = engines[0]
    assert summary["step"] == 4 and summary["skipped_steps"] == 2
    assert engine.global_steps == 6 and engine.micro_steps == engine.global_steps * 2  # 11 and 5 before the fix
    assert engine.lr_scheduler.last_epoch == 4  # skipped groups do not advance the schedule
    assert all(torch.isfinite(p).all() for p in engine.module.parameters())


# ----------------------------------------------------------------------------- hostile checkpoints

class RunsCode:
    """Unpickling this creates `marker`: what a crafted checkpoint file does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_pickles_in_a_checkpoint_do_not_run_on_resume(builtin_data, tmp_path):
    """Each file kind a resume reads: ours (safetensors + JSON, no code by construction; the old
    rank*.pt pickles are refused) and DeepSpeed's model and ZeRO optimizer states (weights_only)."""
    out = tmp_path / "run"
    loop.train(experiment(builtin_data, out, "train.steps=2", "train.ckpt_every=2", "train.zero_stage=1"))
    ckpt = out / "checkpoints" / "step_00000002"
    pristine = tmp_path / "pristine"
    shutil.copytree(ckpt, pristine)
    marker = tmp_path / "code-ran"
    for victim, message in (("mp_rank_00_model_states.pt", "refused to load"),
                            ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "refused to load"),
                            ("rank0.pt", "older pickle format")):
        shutil.rmtree(ckpt)
        shutil.copytree(pristine, ckpt)
        if victim == "rank0.pt":  # a checkpoint of the old format
            (ckpt / "rank0.safetensors").unlink()
            (ckpt / "experiment.json").unlink()
        torch.save({"module": RunsCode(marker), "step": 2}, ckpt / victim)
        with pytest.raises(CheckpointError, match=message):
            loop.train(experiment(builtin_data, out, "train.steps=3", "train.ckpt_every=2", "train.zero_stage=1"))
        assert not marker.exists(), victim
    with pytest.raises(CheckpointError, match="refused to load"):  # an expert file, as export reads them
        torch.save({"x": RunsCode(marker)}, tmp_path / "layer_0_expert_0_mp_rank_00_model_states.pt")
        load_deepspeed_file(tmp_path / "layer_0_expert_0_mp_rank_00_model_states.pt")
    assert not marker.exists()
    shutil.rmtree(ckpt)
    shutil.copytree(pristine, ckpt)  # the real files load: the allow-list covers ZeRO-1's optimizer state
    damaged = out / "checkpoints" / "step_00000004"  # a newer checkpoint missing its model states: skipped
    shutil.copytree(pristine, damaged)
    (damaged / "mp_rank_00_model_states.pt").unlink()
    with pytest.warns(UserWarning) as warned:
        summary = loop.train(experiment(builtin_data, out, "train.steps=3", "train.ckpt_every=2", "train.zero_stage=1"))
    messages = [str(w.message) for w in warned]
    assert any("checkpoint skipped: " in m and "step_00000004/mp_rank_00_model_states.pt is missing" in m and
               "resuming from step_00000002" in m for m in messages), messages
    assert any(re.search(r"applied from step 2: train.steps \(2 -> 3\)", m) for m in messages), messages
    assert summary["step"] == 3


# ----------------------------------------------------------------------------- resume with another config

def test_resume_refuses_model_and_layout_changes_and_records_the_rest(builtin_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    loop.train(experiment(builtin_data, out, "train.steps=2", "train.ckpt_every=2"))
    first_config = json.loads((out / "config.json").read_text())
    with monkeypatch.context() as m:
        forbid_building(m)
        with pytest.raises(ConfigError) as e:
            loop.train(experiment(builtin_data, out, "train.steps=4", "model.moe.num_experts=8",
                                  "train.zero_stage=2"))
    assert "model.moe.num_experts (4 -> 8)" in str(e.value) and "ZeRO stage (0 -> 2)" in str(e.value)
    assert "train.init_from" in str(e.value) and "train.resume=false" in str(e.value)
    assert json.loads((out / "config.json").read_text()) == first_config  # not overwritten

    with pytest.warns(UserWarning, match=r"applied from step 2: .*data.batch_size \(4 -> 2\).*train.lr"):
        summary = loop.train(experiment(builtin_data, out, "train.steps=3", "train.ckpt_every=2", "data.batch_size=2",
                                        "train.lr=1e-3"))
    assert summary["step"] == 3
    changes = [json.loads(line) for line in (out / "config_changes.jsonl").read_text().splitlines()]
    assert changes == [{**changes[0], "step": 2, "ignored": {},
                        "applied": {"data.batch_size": [4, 2], "train.lr": [0.002, 0.001], "train.steps": [2, 3]}}]
    assert json.loads((out / "config.json").read_text())["data"]["batch_size"] == 2
    m = read_metrics(out)
    assert m[3]["tokens_per_s"] > 0 and m[3]["lr"] < 1e-3  # the new lr (decayed) is the one applied

    # the route for what a resume refuses: the checkpoint's weights as an export, into train.init_from
    export = export_checkpoint(out / "checkpoints" / "step_00000003", tmp_path / "export")
    model, meta = load_pretrained(export)
    saved = load_deepspeed_file(out / "checkpoints" / "step_00000003" / "mp_rank_00_model_states.pt")["module"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    summary = loop.train(experiment(builtin_data, tmp_path / "wider", "train.steps=1", "train.zero_stage=2",
                                    f"train.init_from={export}"))
    assert summary["step"] == 1

    # a new stage from the run's export (train.freeze changed): recorded at step 0, not refused; the
    # export lists both stages
    stage2 = tmp_path / "stage2"
    loop.train(experiment(builtin_data, stage2, "train.steps=1", f"train.init_from={out / 'final'}",
                          "train.freeze=[vision]"))
    (line,) = [json.loads(x) for x in (stage2 / "config_changes.jsonl").read_text().splitlines()]
    assert line["step"] == 0 and line["applied"] == {"train.freeze": [[], ["vision"]]}
    assert json.loads((stage2 / "final" / "config.json").read_text())["stages"] == [
        {"freeze": [], "lr_scale": {}, "steps": 3}, {"freeze": ["vision"], "lr_scale": {}, "steps": 1}]

    # train.resume=false starts over in the same folder, with the previous run moved aside, not mixed in
    with pytest.warns(UserWarning, match="previous run's files are in"):
        loop.train(experiment(builtin_data, out, "train.steps=1", "train.resume=false", "model.moe.num_experts=8"))
    aside = next(out.glob("previous-*"))
    assert checkpoints(out) == ["step_00000001"] and checkpoints(aside) == ["step_00000002", "step_00000003"]
    assert sorted(read_metrics(out)) == [1] and sorted(read_metrics(aside)) == [1, 2, 3]


def test_a_checkpoint_from_before_a_field_existed_resumes_at_that_fields_default():
    """A field added since the checkpoint was written (its record lacks the key) counts as its default: the
    older code's behaviour. Only a value other than the default is a change (it used to be None -> default,
    refused for every new model field)."""
    from cmoe_vlm.training.config import ExperimentConfig
    from cmoe_vlm.training.resume import compare, experiment_record

    requested = experiment_record(ExperimentConfig(), 1)
    saved = json.loads(json.dumps(requested))
    del saved["config"]["model"]["attention_bias"], saved["config"]["projector"]["center"]
    assert compare(saved, requested) == {"refused": {}, "applied": {}, "ignored": {}}
    changed = json.loads(json.dumps(requested))
    changed["config"]["projector"]["center"] = True
    assert compare(saved, changed)["refused"] == {"projector.center": [False, True]}
    # a field removed since (#25), saved with the value the code kept: no change; another value: refused
    saved["config"]["model"]["chunk"].update(split_at_modality_switch=True, sample_boundaries=True,
                                             ratio_statistic="pooled", force_all_boundaries=False)
    assert compare(saved, requested) == {"refused": {}, "applied": {}, "ignored": {}}
    saved["config"]["model"]["chunk"]["sample_boundaries"] = False
    assert compare(saved, requested)["refused"] == {"model.chunk.sample_boundaries": [False, None]}


def test_the_ratio_controller_resumes_from_the_checkpoint_and_from_an_older_models_buffer(builtin_data, tmp_path):
    """The controller's mu is the loop's state, saved in each rank's checkpoint file: a resume from step 2
    repeats the uninterrupted run's step 3 exactly. A checkpoint written while the model held mu as the
    buffer lm.ratio_mu (main 69f0ad8 and earlier) resumes too, with that value in the controller."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    def run_to_step_3(out: Path) -> dict:
        loop.train(experiment(builtin_data, out, "train.steps=3", "train.ckpt_every=2", "train.keep_last=3",
                              "model.chunk.ratio_integral=0.05"))
        return read_metrics(out)[3]

    want = run_to_step_3(tmp_path / "run")
    step2 = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert want["ratio_integral_all"] != 0
    for form in ("checkpoint state", "model buffer"):
        shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000003", ignore_errors=True)
        if form == "model buffer":  # as 69f0ad8 wrote it: mu in the module's weights, none in the rank file
            rank_file = step2 / "rank0.safetensors"
            with safe_open(str(rank_file), "pt") as f:
                meta, tensors = json.loads(f.metadata()["state"]), {k: f.get_tensor(k) for k in f.keys()}
            mu = torch.tensor(meta.pop("ratio_controller")["mu"])
            save_file(tensors, str(rank_file), metadata={"state": json.dumps(meta)})
            states = step2 / "mp_rank_00_model_states.pt"
            saved = torch.load(states, weights_only=False)
            saved["module"]["lm.ratio_mu"] = mu
            torch.save(saved, states)
        got = run_to_step_3(tmp_path / "run")
        assert (got["ratio_integral_all"], got["loss"]) == (want["ratio_integral_all"], want["loss"]), form


# ----------------------------------------------------------------------------- errors before anything is built

def test_config_errors_name_the_field_before_anything_is_built(builtin_data, tmp_path, monkeypatch):
    forbid_building(monkeypatch)
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 3}}')
    cases = {
        "data.shards": [f"data.shards={tmp_path}/nothing-*.tar"],
        "data.tokenizer": [f"data.tokenizer={tmp_path}/no-tokenizer"],
        "data.num_workers": ["data.num_workers=6", "data.steps_per_epoch=5"],  # 5 shards for 6 workers
        "train.heldout_shards": [f"train.heldout_shards={tmp_path}/empty-dir"],
        "train.deepspeed_config = ": [f"train.deepspeed_config={tmp_path}/missing.json"],
        "sets ZeRO stage 3": [f"train.deepspeed_config={ds}"],
        "train.init_from": [f"train.init_from={tmp_path}/no-export"],
        "is or holds train.out_dir": [f"train.init_from={tmp_path}/x"],  # would overwrite the export's config.json
        "train.out_dir = ": [f"train.out_dir={ds}"],  # a file
    }
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text("{}")
    for expected, extra in cases.items():
        exp = load_experiment(ROOT / "configs/tiny.yaml", overrides(builtin_data, tmp_path / "x", *extra))
        with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
            loop.train(exp)
    for extra, expected in ((["train.betas=[1.5, 0.9]"], "train.betas"), (["train.lr=.inf"], "train.lr = inf: "
                                                                           "must be a finite number")):
        with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):
            load_experiment(ROOT / "configs/tiny.yaml", extra)
    (tmp_path / "bad.yaml").write_text("model: {dim: 64\n")
    for path, expected in ((tmp_path / "bad.yaml", "not valid YAML"), (tmp_path / "none.yaml", "cannot read")):
        with pytest.raises(ConfigError, match=expected):
            load_experiment(path)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(ROOT / "train_vlm.py"), str(ROOT / "configs/tiny.yaml"),
                           f"data.shards={tmp_path}/empty-dir"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("config error: data.shards")


def test_heldout_set_without_tokens_reports_no_loss(builtin_data, tmp_path):
    from tests.data_pipelines.conftest import write_tar
    heldout = tmp_path / "heldout"
    heldout.mkdir()
    write_tar(heldout / "bad.tar", [{"__key__": "0", "png": b"not a png", "txt": b"caption"}])
    with pytest.warns(UserWarning, match="no token to predict"):
        summary = loop.train(experiment(builtin_data, tmp_path / "run", "train.steps=1",
                                        f"train.heldout_shards={heldout}"))
    assert "lm_loss" not in summary["heldout"] and summary["heldout"]["predicted_tokens"] == 0
    assert "bad_image" in summary["heldout"]["error"]


# ----------------------------------------------------------------------------- export

def test_export_refuses_nonfinite_weights_and_is_as_readable_as_its_config(tmp_path):
    model = ConceptMoEVLM(VLMConfig())
    out = save_pretrained(model, tmp_path / "ok")
    mode = stat.S_IMODE((out / "model.safetensors").stat().st_mode)
    assert mode == stat.S_IMODE((out / "config.json").stat().st_mode)  # 0600 before
    with torch.no_grad():
        model.lm.lm_head.weight[0, 0] = float("nan")
        model.lm.embed.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteWeightsError, match=r"2 of \d+ tensors hold NaN or inf \(lm.embed.weight, "
                                                     r"lm.lm_head.weight\)"):
        save_pretrained(model, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- disk full

def can_mount_tmpfs() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null || "
         f"mount -t tmpfs -o size=1m tmpfs {Path.home()}"], capture_output=True).returncode == 0


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs unshare -rm and tmpfs (a private small file system)")
def test_disk_full_while_checkpointing_says_so_and_keeps_the_previous_checkpoint(builtin_data, tmp_path):
    """out_dir on a 9 MiB tmpfs: two 3.7 MiB checkpoints fit, the third does not."""
    out = tmp_path / "small"
    out.mkdir()
    args = [sys.executable, str(ROOT / "train_vlm.py"), str(ROOT / "configs/tiny.yaml"),
            *overrides(builtin_data, out, *FAST, "train.steps=6", "train.ckpt_every=1", "train.keep_last=2")]
    script = (f'mount -t tmpfs -o size=9m tmpfs {out} || exit 99; "$@"; rc=$?; echo LISTING; '
              f"ls -a {out}/checkpoints {out}/checkpoints/.staging; exit $rc")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: writing checkpoint step_") and "no space left" in last, last
    assert "removed the partial" in last and "kept step_" in last
    listing = proc.stdout.split("LISTING")[1]
    kept = sorted(name for name in listing.split() if name.startswith("step_"))
    assert len(kept) == 2 and kept[-1] in last  # the previous checkpoints survive
    staging = listing.split(".staging:")[1].split()
    assert sorted(staging) == [".", ".."]  # nothing half-written left behind


# ----------------------------------------------------------------------------- two processes

def checkpoint_state(run: Path, rank: int) -> dict:
    """This rank's state in the run's newest checkpoint (loader position, counters, ratio controller)."""
    from safetensors import safe_open
    newest = sorted((run / "checkpoints").glob("step_*"))[-1]
    with safe_open(str(newest / f"rank{rank}.safetensors"), "pt") as f:
        return json.loads(f.metadata()["state"])


def rank_results(run: Path) -> list[tuple[dict, dict[str, torch.Tensor]]]:
    return [(json.loads((run / f"rank{r}.json").read_text()), load_file(str(run / f"rank{r}.safetensors")))
            for r in (0, 1)]


@pytest.mark.slow
def test_two_process_faults_on_one_rank(builtin_data, tmp_path):
    """One `deepspeed --num_gpus 2` launch on CPU (gloo), three runs (tests/training/two_ranks.py): a NaN
    loss and a NaN gradient on one rank only under grad_accum 2 (ZeRO-0; ZeRO-2 with ep_size 2): both
    ranks skip the same steps, finish, and hold identical weights and ratio controller; then SIGTERM to
    one rank only: both stop at the same step with one checkpoint. The expert-parallel checkpoint then
    refuses a one-process resume and exports into our layout."""
    from .test_expert_parallel import deepspeed_cmd

    out = tmp_path / "two"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["DS_ACCELERATOR"] = "cpu"
    data = json.dumps({k: str(v) for k, v in builtin_data.items()})
    proc = subprocess.run(deepspeed_cmd("--num_gpus", "2", "--master_port", "29631",
                                        str(ROOT / "tests/training/two_ranks.py"), data, str(out)),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    # a: ZeRO-0, rank 1 alone had a NaN loss (group 2) and a NaN gradient (group 4)
    (info0, w0), (info1, w1) = rank_results(out / "a")
    for info in (info0, info1):
        assert info["summary"]["step"] == 5 and info["summary"]["skipped_steps"] == 2
        assert info["global_steps"] == 7 and info["micro_steps"] == 14
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    mu = [checkpoint_state(out / "a", rank)["ratio_controller"]["mu"] for rank in (0, 1)]  # the loop's controller
    assert mu[0] == mu[1] and all(m != 0 for m in mu[0])

    # b: ZeRO-2 + ep_size 2, rank 0 alone had a NaN loss: both skipped it; replicated weights agree
    (info0, w0), (info1, w1) = rank_results(out / "b")
    for info in (info0, info1):
        assert info["summary"]["step"] == 4 and info["summary"]["skipped_steps"] == 1
        assert info["micro_steps"] == 2 * info["global_steps"] == 10
    shared = [k for k in w0 if ".deepspeed_experts." not in k]
    assert shared and all(torch.equal(w0[k], w1[k]) for k in shared)

    # DeepSpeed's expert-parallel checkpoint holds one file per global expert
    ckpt = out / "b" / "checkpoints" / "step_00000004"
    assert len(list(ckpt.glob("layer_0_expert_*_model_states.pt"))) == 4

    # c: resumed b (expert files, ZeRO-2 optimizer partitions: loaded weights_only); SIGTERM on rank 1 only
    (info0, _), (info1, _) = rank_results(out / "c")
    for info in (info0, info1):
        assert info["summary"]["interrupted"] and info["summary"]["step"] == 6
    assert checkpoints(out / "b")[-1] == "step_00000006"

    # a one-process resume of that checkpoint is refused before anything is built, naming the way out
    with pytest.raises(ConfigError, match=r"number of processes \(2 -> 1\), .*train.ep_size \(2 -> 1\).*init_from"):
        loop.train(load_experiment(ROOT / "configs/tiny.yaml", overrides(
            builtin_data, out / "b", *FAST, "train.steps=8", "train.ckpt_every=2", "train.grad_accum=2",
            "train.zero_stage=2", "model.moe.norm_topk_prob=true")))
    # ... and its export (experts gathered into our layout) is b's final export at step 4
    export = export_checkpoint(ckpt, tmp_path / "export")
    final = load_file(str(out / "b" / "final" / "model.safetensors"))
    mine = load_file(str(export / "model.safetensors"))
    assert mine.keys() == final.keys() and all(torch.equal(mine[k], final[k]) for k in final)
    expert3 = load_deepspeed_file(ckpt / "layer_0_expert_3_mp_rank_00_model_states.pt")
    w = next(v for k, v in expert3.items() if k.endswith("w13.weight"))
    torch.testing.assert_close(mine["lm.encoder.layers.0.moe.experts.w13"][3], w.T.float())
    model, _ = load_pretrained(export)
    assert torch.isfinite(model(Batch.of(torch.randint(0, 256, (1, 32)))).logits).all()
