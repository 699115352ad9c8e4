import pytest
import torch

from data_pipelines.builtin import write_builtin_dataset

# A tiny experiment: small enough that a training step takes well under a second on 2 cores.
TINY_OVERRIDES = [
    "model.dim=64", "model.moe.expert_hidden=64", "model.encoder_layers=1", "model.concept_layers=1",
    "model.decoder_layers=1", "vision.depth=1", "vision.embed_dim=48", "data.seq_len=256",
    "data.batch_size=4", "data.shuffle_buffer=50", "train.warmup_steps=2", "train.tensorboard=false",
]


@pytest.fixture(scope="session")
def builtin_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("builtin")
    return write_builtin_dataset(root, num_train=300, num_heldout=40, maxcount=60, text_chars=1500)


def overrides(data, out_dir, *extra: str) -> list[str]:
    return TINY_OVERRIDES + [f"data.shards={data['train']}", f"train.heldout_shards={data['heldout']}",
                             f"train.out_dir={out_dir}", *extra]


class NaNGradient(torch.autograd.Function):
    """Identity forward; a NaN gradient backward: finite outputs (and loss) whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")
