"""How training runs the model (cmoe_vlm/training/prepare.py, mfu.py): activation checkpointing gives
the plain run's gradients while keeping fewer activations, bf16 autocast on CPU trains over fp32
master weights, the compiled step follows the eager one with a bounded number of graphs while the
concept count changes every step, and the MFU peak is measured once and cached."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from cmoe_base import Batch
from cmoe_vlm.model.chunk import ChunkConfig
from cmoe_vlm.model.layers.moe import MoEConfig
from cmoe_vlm.model.conceptmoe import ConceptMoE, ModelConfig
from cmoe_vlm.objective import Objective
from cmoe_vlm.training import mfu, prepare
from cmoe_vlm.training.config import TrainConfig


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=64, dim=32, num_heads=4, encoder_layers=1, concept_layers=2, decoder_layers=2,
                moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32), chunk=ChunkConfig())
    return ModelConfig(**{**base, **kw})


def packed_docs() -> torch.Tensor:
    """Two rows of 48: documents of 20, 15, 13 tokens; one of 40, then padding."""
    return torch.tensor([[0] * 20 + [1] * 15 + [2] * 13, [0] * 40 + [-1] * 8])


def saved_bytes_and_grads(mode: str, seed: int = 0) -> tuple[int, float, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = ConceptMoE(tiny()).train()
    assert prepare.apply_activation_checkpointing(model, mode) == {"off": 0, "blocks": 5, "concept": 2}[mode]
    x = torch.randint(0, 64, (2, 48))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(1)
    batch = Batch.of(x, doc_ids=packed_docs(), labels=x.roll(-1, 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = Objective(model.cfg)(model(batch), batch).total
    kept = sum(saved)  # what the forward kept for backward (recomputation's own saves come later)
    loss.backward()
    return kept, loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_the_plain_gradients_and_keeps_less():
    plain_kept, plain_loss, plain = saved_bytes_and_grads("off")
    kept = {}
    for mode in ("concept", "blocks"):
        kept[mode], loss, grads = saved_bytes_and_grads(mode)
        assert loss == plain_loss and grads.keys() == plain.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    assert kept["blocks"] < kept["concept"] < plain_kept, (kept, plain_kept)


def test_train_config_modes():
    assert TrainConfig(activation_checkpointing=False).activation_checkpointing == "off"  # YAML `off`
    with pytest.raises(Exception, match="activation_checkpointing"):
        TrainConfig(activation_checkpointing=True)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not prepare.compile_enabled(TrainConfig(), cpu) and prepare.compile_enabled(TrainConfig(), cuda)
    assert prepare.compile_enabled(TrainConfig(compile=True), cpu)


def test_bf16_autocast_trains_on_cpu_over_fp32_weights():
    """Five steps on one batch in bf16 autocast: the loss falls and follows fp32 to bf16 precision,
    weights stay fp32."""
    losses = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = ConceptMoE(tiny()).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[bf16] = []
        x = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(0))
        for i in range(5):  # the same batch: the loss must fall
            torch.manual_seed(10 + i)
            batch = Batch.of(x, doc_ids=packed_docs(), labels=x.roll(-1, 1))
            with prepare.autocast(torch.device("cpu"), bf16):
                out = model(batch)
                loss = Objective(model.cfg)(out, batch).total
            assert (out.logits.dtype == torch.bfloat16) == bf16
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[bf16].append(loss.item())
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[True][-1] < losses[True][0]
    for a, b in zip(losses[True], losses[False]):
        assert a == pytest.approx(b, rel=3e-2)


def test_compiled_step_matches_eager_with_bounded_graphs():
    """20 training steps of a compiled tiny model (inductor) on batches whose concept count M changes
    every step: the same losses as eager, and no graph built after the first steps (M goes dynamic
    after one recompile). ~1 min, almost all of it compilation."""
    torch._dynamo.reset()
    cfg = tiny(encoder_layers=1, concept_layers=1, decoder_layers=1)
    losses, graphs = {}, []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = ConceptMoE(cfg).train()
        if compiled:
            assert prepare.apply_compile(model) == 3
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[compiled], concepts = [], set()
        for i in range(20):
            x = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(i))
            torch.manual_seed(100 + i)
            batch = Batch.of(x, doc_ids=packed_docs(), labels=x.roll(-1, 1))
            out = model(batch)
            loss = Objective(cfg)(out, batch).total
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[compiled].append(loss.item())
            concepts.add(sum(map(sum, out.concept_lengths)))
            if compiled and i in (4, 19):
                graphs.append(prepare.compiled_graphs())
        assert len(concepts) > 5  # M really changed
    for a, b in zip(losses[True], losses[False]):
        assert a == pytest.approx(b, rel=1e-5)
    assert graphs[0] > 0 and graphs[1] == graphs[0], graphs


def test_peak_flops_measured_once_cached_and_overridden(tmp_path, monkeypatch):
    monkeypatch.setenv("CMOE_CACHE_DIR", str(tmp_path / "cmoe-vlm"))
    calls = []

    def fake(dtype, utilisation=0.97):
        calls.append(dtype)
        return mfu.Peak(1.5e11, time.time(), (0.1, 0.1, 0.1), utilisation, torch.get_num_threads())

    monkeypatch.setattr(mfu, "measure_matmul_peak", fake)
    cpu = torch.device("cpu")
    first, source = mfu.peak_flops(cpu, bf16=False)
    again, _ = mfu.peak_flops(cpu, bf16=False)
    assert first == again == 1.5e11 and calls == [torch.float32] and "measured" in source and "load 0.1" in source
    cached = json.loads((tmp_path / "cmoe-vlm" / "peak_flops.json").read_text())
    key = f"{mfu.cpu_model()} | threads={torch.get_num_threads()} | fp32"
    assert list(cached) == [key] and cached[key]["flops"] == 1.5e11 and cached[key]["load"] == [0.1, 0.1, 0.1]
    # a step realized more than the peak: measured again, and never an MFU above 100%
    assert mfu.raised_peak(1e11, bf16=False)[0] == 1.5e11 and len(calls) == 2
    assert mfu.raised_peak(2e11, bf16=False)[0] == 2e11
    # an old-format entry (a bare number, measured in 0.25 s) or an expired one is measured again
    (tmp_path / "cmoe-vlm" / "peak_flops.json").write_text(json.dumps({key: 7.8e10}))
    assert mfu.peak_flops(cpu, bf16=False)[0] == 1.5e11 and len(calls) == 4
    cached[key]["measured_at"] -= (mfu.CACHE_DAYS + 1) * 86400
    (tmp_path / "cmoe-vlm" / "peak_flops.json").write_text(json.dumps(cached))
    mfu.peak_flops(cpu, bf16=False)
    assert len(calls) == 5
    assert mfu.peak_flops(cpu, bf16=False, override_tflops=2.5) == (2.5e12, "train.peak_tflops")
    assert mfu.accelerator_peak("NVIDIA H100 80GB HBM3", bf16=True) == 989e12
    assert mfu.accelerator_peak("NVIDIA H100 PCIe", bf16=True) == 756e12
    assert mfu.accelerator_peak("NVIDIA A100-SXM4-40GB", bf16=False) == 19.5e12
    assert mfu.accelerator_peak("Some New GPU", bf16=True) is None
    assert mfu.accelerator_peak("NVIDIA L40", bf16=True) == 181e12  # not the L4's (a substring match gave 121)
    assert mfu.accelerator_peak("NVIDIA L4", bf16=True) == 121e12
    assert mfu.accelerator_peak("NVIDIA A10", bf16=True) == 125e12


def test_a_peak_measured_under_contention_is_not_cached(tmp_path, monkeypatch):
    """Busy processes on every core while the peak is measured: the measurement sees its threads
    descheduled (utilisation below the quiet threshold), uses the figure for this run and caches nothing."""
    monkeypatch.setenv("CMOE_CACHE_DIR", str(tmp_path / "cmoe-vlm"))
    real = mfu.measure_matmul_peak
    monkeypatch.setattr(mfu, "measure_matmul_peak", lambda dtype: real(dtype, sizes=(512,), seconds=1.0))
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * (os.cpu_count() or 1))]
    try:
        time.sleep(0.3)
        peak = mfu.cpu_peak(bf16=False)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert not peak.quiet and peak.utilisation < mfu.QUIET_UTILISATION and peak.flops > 0
    assert "contended" in peak.describe()
    assert not (tmp_path / "cmoe-vlm" / "peak_flops.json").exists()


def test_measuring_the_peak_leaves_the_training_random_numbers_alone():
    """A run that measured the CPU peak (empty cache) drew other boundary samples than one that read the
    cache: two fresh runs of one config differed from step 1 unless an earlier test had filled the cache."""
    torch.manual_seed(0)
    want = torch.rand(4)
    torch.manual_seed(0)
    mfu.measure_matmul_peak(torch.float32, sizes=(64,), seconds=0.01)
    assert torch.equal(torch.rand(4), want)
