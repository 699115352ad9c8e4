"""Driver of tests/training/test_faults.py::test_two_process_faults, launched as `deepspeed --num_gpus 2
two_ranks.py DATA OUT` on CPU: three training runs in one 2-process launch (each launch costs ~1 min of
start-up), with faults injected on one rank only. Each run writes, per rank, OUT/<run>/rank{r}.json
(the summary and DeepSpeed's step counters) and OUT/<run>/rank{r}.safetensors (the module's state).

    a  ZeRO-0, ep_size 1, grad_accum 2, ratio integral on: rank 1 alone sees a NaN loss (its 3rd
       training forward) and a NaN gradient (its 8th); 5 steps.
    b  ZeRO-2, ep_size 2, grad_accum 2: rank 0 alone sees a NaN loss (its 3rd forward); 4 steps,
       checkpoints at 2 and 4.
    c  resumes b for 8 steps; rank 1 alone gets SIGTERM during its 3rd forward.
"""
import json
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cmoe_vlm.training import loop  # noqa: E402
from cmoe_vlm.training.config import load_experiment  # noqa: E402
from cmoe_vlm.model.vlm import ConceptMoEVLM  # noqa: E402
from tests.training.conftest import NaNGradient, overrides  # noqa: E402

RUNS = {
    "a": (["train.zero_stage=0", "train.grad_accum=2", "train.steps=5", "model.chunk.ratio_integral=0.05"],
          {1: {3: "nan_loss", 8: "nan_grad"}}),
    "b": (["train.zero_stage=2", "train.ep_size=2", "train.grad_accum=2", "train.steps=4", "train.ckpt_every=2",
           "model.moe.norm_topk_prob=true"], {0: {3: "nan_loss"}}),
    "c": (["train.zero_stage=2", "train.ep_size=2", "train.grad_accum=2", "train.steps=8", "train.ckpt_every=2",
           "model.moe.norm_topk_prob=true"], {1: {3: "sigterm"}}),
}


def main() -> None:
    data, out = (a for a in sys.argv[1:] if not a.startswith("--local_rank"))
    data = json.loads(data)
    real_forward = ConceptMoEVLM.forward
    for name, (extra, faults) in RUNS.items():
        calls = {"n": 0}

        def forward(self, *args, **kwargs):
            result = real_forward(self, *args, **kwargs)
            if not self.training:
                return result
            calls["n"] += 1
            fault = faults.get(torch.distributed.get_rank(), {}).get(calls["n"])
            if fault == "nan_loss":
                result.logits = result.logits * float("nan")
            elif fault == "nan_grad":
                result.logits = NaNGradient.apply(result.logits)
            elif fault == "sigterm":
                signal.raise_signal(signal.SIGTERM)
            return result

        ConceptMoEVLM.forward = forward
        run_dir = Path(out) / ("b" if name == "c" else name)
        exp = load_experiment(ROOT / "configs/tiny.yaml",
                              overrides(data, run_dir, "data.num_workers=0", "train.eval_batches=1", *extra))
        engines = []
        original = loop.build_engine

        def capture(*args, **kwargs):
            result = original(*args, **kwargs)
            engines.append(result[0])
            return result

        loop.build_engine = capture
        summary = loop.train(exp)
        loop.build_engine = original
        engine = engines[0]
        rank = torch.distributed.get_rank()
        counters = {k: getattr(engine, k) for k in ("micro_steps", "global_steps", "skipped_steps")}
        (Path(out) / name).mkdir(parents=True, exist_ok=True)
        (Path(out) / name / f"rank{rank}.json").write_text(json.dumps({"summary": summary, **counters}))
        save_file({k: v.detach().contiguous() for k, v in engine.module.state_dict().items()},
                  str(Path(out) / name / f"rank{rank}.safetensors"))
        ConceptMoEVLM.forward = real_forward
    from cmoe_vlm.training.engine import shutdown_distributed
    shutdown_distributed()


if __name__ == "__main__":
    main()
