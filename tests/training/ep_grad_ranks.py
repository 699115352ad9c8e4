"""Driver of tests/training/test_expert_parallel.py::test_dropless_exchange_gradients_match_one_process, run
as two plain processes (RANK 0 and 1, gloo): each rank holds half of the same global tokens, rank 0 fewer
than rank 1, and the expert-parallel layer (ep_size 2, dropless dispatch) must give the one-process MoE's
outputs and, for a loss summed over both ranks, its gradients: each rank's input rows, its own experts,
and the replicated router and shared expert once summed over the ranks. Writes OUT/rank{r}.json with the
largest differences."""
import copy
import json
import sys
from pathlib import Path

import cmoe_base  # noqa: F401  (before torch)
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cmoe_vlm.model.layers.moe import MoE, MoEConfig  # noqa: E402
from cmoe_vlm.objective import balance_loss  # noqa: E402
from cmoe_vlm.training.engine import setup_distributed, shutdown_distributed  # noqa: E402
from cmoe_vlm.training.expert_parallel import DeepSpeedMoE  # noqa: E402

CASES = {"top2": dict(num_experts=4, top_k=2), "top1+shared": dict(num_experts=4, top_k=1, shared_expert_hidden=16),
         "top3-of-8": dict(num_experts=8, top_k=3)}
SPLIT = (7, 19)  # tokens on rank 0 and rank 1


def loss_of(out: torch.Tensor, stats, probe: torch.Tensor) -> torch.Tensor:
    return (out * probe).sum() + 0.1 * balance_loss(stats)


def run_case(name: str, kw: dict, rank: int) -> dict[str, float]:
    torch.manual_seed(0)
    ref = MoE(16, MoEConfig(expert_hidden=16, **kw))
    ep = DeepSpeedMoE(copy.deepcopy(ref), ep_size=2)
    ep.layer.set_deepspeed_parallelism()
    x = torch.randn(sum(SPLIT), 16)
    probe = torch.randn(sum(SPLIT), 16)
    lo, hi = (0, SPLIT[0]) if rank == 0 else (SPLIT[0], sum(SPLIT))
    # one process on the global tokens; the balance loss is per rank, so it is summed over the two halves
    xr = x.clone().requires_grad_()
    out_ref = ref(xr)[0]
    halves = [ref(xr[a:b])[1] for a, b in ((0, SPLIT[0]), (SPLIT[0], sum(SPLIT)))]
    ((out_ref * probe).sum() + 0.1 * sum(balance_loss(s) for s in halves)).backward()

    xe = x[lo:hi].clone().requires_grad_()
    out, stats = ep(xe)
    loss_of(out, stats, probe[lo:hi]).backward()

    diff = {"out": (out - out_ref[lo:hi]).abs().max().item(), "x.grad": (xe.grad - xr.grad[lo:hi]).abs().max().item()}
    first = rank * ep.num_local
    diff["local expert grad norm (reference)"] = -ref.experts.w13.grad[first:first + ep.num_local].norm().item()
    for i, e in enumerate(ep._local_experts()):
        diff[f"w13.grad[{first + i}]"] = (e.w13.weight.grad.T - ref.experts.w13.grad[first + i]).abs().max().item()
        diff[f"w2.grad[{first + i}]"] = (e.w2.weight.grad.T - ref.experts.w2.grad[first + i]).abs().max().item()
    replicated = {"router": (ep.layer.deepspeed_moe.gate.wg.weight, ref.router.weight)}
    if ref.shared is not None:
        replicated["shared.w13"] = (ep.shared.w13.weight, ref.shared.w13.weight)
    for key, (p, ref_p) in replicated.items():
        g = p.grad.clone()
        dist.all_reduce(g)
        diff[key + ".grad"] = (g - ref_p.grad).abs().max().item()
    return diff


def main() -> None:
    out = Path(sys.argv[1])
    rank, _ = setup_distributed()
    result = {name: run_case(name, kw, rank) for name, kw in CASES.items()}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    shutdown_distributed()


if __name__ == "__main__":
    main()
