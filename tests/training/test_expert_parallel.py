"""Expert parallelism through DeepSpeed MoE: same numbers as our MoE, and a real 2-node launch (the
2-process ZeRO-2 expert-parallel run with its checkpoint and export: test_faults.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cmoe_base import Batch
from cmoe_vlm.model.layers.moe import MoE, MoEConfig
from cmoe_vlm.objective import balance_loss
from cmoe_vlm.training.engine import setup_distributed
from cmoe_vlm.training.expert_parallel import DeepSpeedMoE, plain_state_dict, swap_in_deepspeed_moe

from .conftest import overrides

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
@pytest.mark.parametrize("top_k,shared", [(1, 0), (2, 0), (3, 16)])
def test_deepspeed_moe_matches_our_moe(top_k, shared, dispatch):
    setup_distributed()
    torch.manual_seed(0)
    ours = MoE(16, MoEConfig(num_experts=4, top_k=top_k, expert_hidden=24, shared_expert_hidden=shared,
                             norm_topk_prob=top_k > 1))
    ds = DeepSpeedMoE(ours, ep_size=1, dispatch=dispatch)
    ds.layer.set_deepspeed_parallelism()
    x = torch.randn(2, 9, 16)
    y_ours, s_ours = ours(x)
    y_ds, s_ds = ds(x)
    torch.testing.assert_close(y_ds, y_ours, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(balance_loss(s_ds), balance_loss(s_ours), atol=1e-6, rtol=1e-5)
    assert torch.equal(s_ds.tokens_per_expert.long(), s_ours.tokens_per_expert)
    # weights come back in our layout
    back = ds.plain_state()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(back[key], value)


def test_swap_keeps_the_model_state_in_plain_layout():
    setup_distributed()
    from cmoe_vlm.model.chunk import ChunkConfig
    from cmoe_vlm.model.conceptmoe import ConceptMoE, ModelConfig

    torch.manual_seed(0)
    model = ConceptMoE(ModelConfig(vocab_size=64, dim=32, num_heads=4, encoder_layers=1, concept_layers=1,
                                   decoder_layers=1, moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32),
                                   chunk=ChunkConfig())).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = Batch.of(torch.randint(0, 64, (2, 20)))
    ref = model(x).logits
    assert swap_in_deepspeed_moe(model, ep_size=1) == 3
    for mod in model.modules():
        if isinstance(mod, DeepSpeedMoE):
            mod.layer.set_deepspeed_parallelism()
    torch.testing.assert_close(model(x).logits, ref, atol=1e-5, rtol=1e-4)
    after = plain_state_dict(model)
    assert after.keys() == before.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k])


def test_dropless_exchange_gradients_match_one_process(tmp_path):
    """Two plain processes (gloo), ep_size 2, uneven tokens per rank (tests/training/ep_grad_ranks.py):
    outputs and gradients (input rows, own experts, replicated router and shared expert summed over the
    ranks) equal the one-process MoE's on the same global tokens."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29651", DS_ACCELERATOR="cpu")
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests/training/ep_grad_ranks.py"), str(tmp_path)], cwd=ROOT,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    for r in (0, 1):
        for case, diffs in json.loads((tmp_path / f"rank{r}.json").read_text()).items():
            assert diffs.pop("local expert grad norm (reference)") < 0, (r, case)  # the experts did get tokens
            assert max(diffs.values()) < 2e-5, (r, case, diffs)


def deepspeed_cmd(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "deepspeed"), *args]


@pytest.mark.slow
def test_two_node_launch_on_loopback(builtin_data, tmp_path):
    """DeepSpeed's own multi-node launcher, two 'nodes' on this machine (docs/design.md §12): --no_ssh, one
    launcher per node rank, expert parallelism across the nodes."""
    out = tmp_path / "nodes"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["DS_ACCELERATOR"] = "cpu"
    args = overrides(builtin_data, out, "train.steps=3", "train.ckpt_every=3", "train.ep_size=2",
                     "train.zero_stage=1", "train.eval_batches=1", "data.num_workers=0")
    procs = [subprocess.Popen(deepspeed_cmd("--hostfile", str(hostfile), "--no_ssh", "--num_nodes", "2", "--num_gpus",
                                            "1", "--node_rank", str(r), "--master_addr", "127.0.0.1", "--master_port",
                                            "29641", str(ROOT / "train_vlm.py"), str(ROOT / "configs/tiny.yaml"), *args),
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    logs = [p.communicate(timeout=1200)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 3 and (out / "final" / "model.safetensors").exists()
    assert len(list((out / "checkpoints" / "step_00000003").glob("zero_pp_rank_*_optim_states.pt"))) == 2
