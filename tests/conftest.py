"""Fixtures shared across the test packages."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINED_STEPS = 200
TRAINED_OVERRIDES = ["model.dim=64", "model.moe.expert_hidden=128", "data.seq_len=256", "data.batch_size=4",
                     "data.num_workers=1", "data.shuffle_buffer=100", "train.ckpt_every=1000", "train.eval_batches=2",
                     f"train.steps={TRAINED_STEPS}", "train.tensorboard=true", "train.peak_tflops=0.1"]


def save_bpe_tokenizer(folder, texts: list[str], vocab_size: int, eos: bool):
    """Train a byte-level BPE tokenizer on `texts` and save it as transformers files in `folder`: bos
    `<s>`, unk `<unk>`, eos `</s>` if `eos`, no pad token (as Mistral's has none)."""
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", *(["</s>"] if eos else [])],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>",
                            **({"eos_token": "</s>"} if eos else {})).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def bpe_tokenizer_folder(tmp_path_factory):
    """A small BPE tokenizer (~300 ids, bos `<s>`, no pad/eos, no image tokens) saved as transformers
    files: what `data_pipelines.tokenizer.HFTokenizer` loads, adding its special tokens."""
    return save_bpe_tokenizer(tmp_path_factory.mktemp("bpe_tokenizer"),
                              ["two red circles and a blue square", "how many circles? 3"] * 20, 300, eos=False)


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory):
    """A 400-token byte-level BPE tokenizer trained on CPython's pydoc topics, saved as a transformers
    tokenizer folder: bos `<s>`, eos `</s>`, unk `<unk>`, no pad token (as Mistral's has none)."""
    from pydoc_data.topics import topics
    return save_bpe_tokenizer(tmp_path_factory.mktemp("bpe_tokenizer"), [topics[k] for k in sorted(topics)[:20]],
                              400, eos=True)


@pytest.fixture(scope="session")
def trained_tiny_run(tmp_path_factory) -> Path:
    """One tiny VLM trained 200 steps on built-in data by `python train_vlm.py` (as a user runs it), with
    TensorBoard, W&B offline where installed, and a given MFU peak: tests/training/test_train.py checks
    the run, the evaluation tests use its export (`trained_model`). Returns the run's folder."""
    from data_pipelines.builtin import write_builtin_dataset

    root = tmp_path_factory.mktemp("trained_tiny")
    data = write_builtin_dataset(root / "data", num_train=1000, num_heldout=40, maxcount=250, text_chars=1500)
    wandb = ["train.wandb=true", "train.wandb_mode=offline"] if importlib.util.find_spec("wandb") or os.environ.get("CI") \
        else []
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, str(ROOT / "train_vlm.py"), str(ROOT / "configs/tiny.yaml"), *TRAINED_OVERRIDES,
                           *wandb, f"data.shards={data['train']}", f"train.heldout_shards={data['heldout']}",
                           f"train.out_dir={root / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "run"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`). On a
    shared 2-core machine OpenMP's spin-waiting made every small op wait for a descheduled second thread
    (a 24-token generation took 18 s instead of 0.8 s)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
