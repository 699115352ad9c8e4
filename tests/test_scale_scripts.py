"""Smoke tests of the scale benchmark and of the GPU check, on CPU: bench/bench_scale.py --quick runs
every section but the long one and writes its JSON and PNG; scripts/gpu_check.py --device cpu --quick
runs every part of the GPU check with DeepSpeed and webdataset made unimportable (the GPU machines have
neither) and prints its table."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_scale_quick(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_scale.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "scale.json").read_text())
    assert res["preliminary"] and "load average" in res["scale_runs"][0]["uptime_start"]
    assert {(r["docs"], r["chunking"]) for r in res["scale"]} == {(1, True), (8, True), (1, False), (8, False)}
    assert all(r["step_s"] > 0 and 0 < r["mfu"] < 5 and r["peak_rss_gib"] > 0 for r in res["scale"])
    assert [r["ac"] for r in res["ac"]] == ["off", "concept", "blocks"]
    assert res["precision"]["bf16"]["losses"] and res["compile"]["compiled"]["graphs"]
    assert set(res["mfu"]["fp32"]["profile"]["share"]) >= {"matmul", "attention"}
    assert (tmp_path / "scale.png").stat().st_size > 10_000


def test_gpu_check_runs_on_cpu_without_deepspeed_or_webdataset(tmp_path):
    out = tmp_path / "gpu_check.json"
    code = ("import runpy, sys; sys.modules['deepspeed'] = None; sys.modules['webdataset'] = None; "
            f"sys.argv = ['gpu_check.py', '--device', 'cpu', '--quick', '--backend', 'eager', '--out', {str(out)!r}]; "
            f"runpy.run_path({str(ROOT / 'scripts' / 'gpu_check.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert not [part for part in ("env", "attention", "generate", "ep") if "error" in res[part]], res
    assert res["attention"]["kernel"] == "buckets" and res["attention"]["max_rel_err_grad"] < 1e-4
    assert [r["compiled"] for r in res["train"]] == [False, True] and all(r["finite"] for r in res["train"])
    assert res["train"][1]["graphs"] > 0 and res["generate"]["cached_equals_uncached"]
    assert res["ep"] == {"skipped": "needs 2 GPUs"}
    assert "compiled / eager speed" in res["table"] and "GPU check" in proc.stdout



def test_bench_peers_quick(tmp_path):
    """bench/bench_peers.py --quick: every family imported with equal logits, every arm timed, JSON and plot."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "bench" / "bench_peers.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "peers.json"
    import torch

    bench.main(["--quick", "--out", str(out), "--threads", str(torch.get_num_threads())])
    res = json.loads(out.read_text())
    assert [f["family"] for f in res["families"]] == ["mixtral", "qwen2_moe", "olmoe"]
    for fam in res["families"]:
        assert fam["logits_max_diff"]["import"] < 1e-4 and len(fam["load_before"]) == 3
        assert fam["fp32"]["decode_same_tokens"]  # greedy in fp32; bf16 rounding may pick other tokens
        for dtype in ("fp32", "bf16"):
            r = fam[dtype]
            assert set(r["decode"]) == {"ours", "transformers", "transformers_on_ours"}
            arms = {"ours", "transformers"} | ({"concept_r2"} if fam["family"] == "mixtral" else set())
            assert set(r["train"]) == set(r["prefill"]) == set(r["train_peak_mib"]) == arms
            assert all(v["per_s"] > 0 for phase in ("train", "prefill", "decode") for v in r[phase].values())
    assert out.with_suffix(".png").stat().st_size > 10_000
