"""The experiment config: model, vision, projector, data and training sections of one YAML file."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import yaml

from data_pipelines.loader import DataConfig, check_data, list_shards
from data_pipelines.tokenizer import Tokenizer, load_tokenizer
from vision import ProjectorConfig, VisionConfig, input_size
from vision.hf_tower import tower_config

from ..config import ConfigError, apply_overrides, check, from_dict, load_yaml
from ..model.conceptmoe import ModelConfig
from ..model.vlm import VLMConfig
from .stages import check_stage_fields


@dataclass
class TrainConfig:
    out_dir: str = "runs/tiny"
    steps: int = 200                       # optimizer steps
    lr: float = 1e-3
    min_lr_ratio: float = 0.1              # cosine decays to lr · min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    grad_accum: int = 1
    zero_stage: int = 0
    ep_size: int = 1                       # expert-parallel group size (DeepSpeed MoE when > 1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPUs that support it, fp32 on CPU;
                                           # bf16 = autocast over fp32 master weights, CPU or GPU (training/prepare.py)
    compile: bool | Literal["auto"] = "auto"  # torch.compile each block; auto = on CUDA only (slower on CPU, design §17)
    activation_checkpointing: Literal["off", "blocks", "concept"] | bool = "off"  # recompute blocks in backward
    peak_tflops: float | None = None       # the device's peak for MFU (null: GPU table, or CPU measured once)
    deepspeed_config: str | None = None    # a user's DeepSpeed JSON; its keys override the generated ones
    seed: int = 0
    log_every: int = 1
    tensorboard: bool = True
    wandb: bool = False                    # Weights & Biases (the `wandb` extra); see training/metrics.py
    wandb_project: str = "cmoe-vlm"
    wandb_name: str | None = None          # run name (default: out_dir's folder name)
    wandb_mode: Literal["online", "offline"] = "online"  # offline: OUT/wandb, for a later `wandb sync`
    ckpt_every: int = 100
    keep_last: int = 2
    resume: bool = True                    # continue from the newest complete checkpoint in out_dir
    max_nonfinite: int = 5                 # stop after this many consecutive non-finite steps
    eval_batches: int = 8                  # held-out batches in the end-of-run evaluation
    heldout_shards: str | None = None      # held-out data for the end-of-run evaluation (null = none)
    init_from: str | None = None           # start from an export's weights (convert, hf_import; training/init.py)
    ratio_ramp_steps: int = 0              # achieved R ramps from 1: boundaries forced w.p. 1 − step/N (conversion)
    freeze: list[str] = field(default_factory=list)  # components that do not train (training/stages.py), e.g. [vision]
    lr_scale: dict[str, float] = field(default_factory=dict)  # component -> learning-rate multiplier (stages.py)

    def __post_init__(self):
        check(self.steps >= 1, "steps", self.steps, "must be >= 1")
        check(self.lr > 0, "lr", self.lr, "must be > 0")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        check(self.grad_accum >= 1, "grad_accum", self.grad_accum, "must be >= 1")
        check(self.zero_stage in (0, 1, 2), "zero_stage", self.zero_stage,
              "must be 0, 1 or 2 (DeepSpeed MoE does not support ZeRO stage 3; use 2 to shard gradients and "
              "optimizer states)")
        check(self.ep_size >= 1, "ep_size", self.ep_size, "must be >= 1")
        check(self.ckpt_every >= 1, "ckpt_every", self.ckpt_every, "must be >= 1")
        check(self.keep_last >= 1, "keep_last", self.keep_last, "must be >= 1")
        check(self.max_nonfinite >= 1, "max_nonfinite", self.max_nonfinite, "must be >= 1")
        check(self.ratio_ramp_steps >= 0, "ratio_ramp_steps", self.ratio_ramp_steps, "must be >= 0 (0 = no ramp)")
        check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0 (0 = no clipping)")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", self.betas,
              "must be two numbers in [0, 1), e.g. [0.9, 0.95]")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        check(self.log_every >= 1, "log_every", self.log_every, "must be >= 1")
        check(self.eval_batches >= 1, "eval_batches", self.eval_batches, "must be >= 1")
        check(self.activation_checkpointing is not True, "activation_checkpointing", True,
              "say which blocks: blocks (every block) or concept (the concept layers only); off for none")
        if self.activation_checkpointing is False:  # YAML reads `off` as false
            self.activation_checkpointing = "off"
        check_stage_fields(self.freeze, self.lr_scale)
        check(self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops", self.peak_tflops,
              "must be > 0 (null: measured on CPU, from the table on GPUs)")


def user_deepspeed_config(cfg: TrainConfig) -> dict:
    """The user's DeepSpeed JSON (`train.deepspeed_config`), read and checked; {} when none."""
    if not cfg.deepspeed_config:
        return {}
    try:
        user = json.loads(Path(cfg.deepspeed_config).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"train.deepspeed_config = {cfg.deepspeed_config!r}: cannot read it as JSON "
                          f"({type(e).__name__}: {e})") from None
    check(isinstance(user, dict), "train.deepspeed_config", cfg.deepspeed_config, "must hold a JSON object")
    stage = user.get("zero_optimization", {}).get("stage", cfg.zero_stage)
    check(stage in (0, 1, 2), "train.deepspeed_config", cfg.deepspeed_config,
          f"sets ZeRO stage {stage}: DeepSpeed MoE supports 0, 1 or 2 (use 2)")
    return user


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    vision: VisionConfig = field(default_factory=lambda: VLMConfig().vision)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        # The data section's image size and tokens per image follow from the model: derived here,
        # and a value the config states must agree.
        height, width = input_size(self.vision)
        check(height == width, "vision.img_size", self.vision.img_size, "must give square images")
        vlm = self.vlm
        derived = {"image_size": height, "tokens_per_image": vlm.max_tokens_per_image,
                   "image_token_unit": vlm.image_unit if self.vision.variable_size else None}
        for name, value in derived.items():
            given = getattr(self.data, name)
            check(given is None or given == value, f"data.{name}", given,
                  f"must equal what the vision and projector configs give ({value}); leave it out to derive it")
        self.data = replace(self.data, **derived)
        check(self.data.seq_len <= self.model.max_seq_len, "data.seq_len", self.data.seq_len,
              f"must be <= model.max_seq_len = {self.model.max_seq_len} (a row may hold one document as long "
              f"as the row; raise model.max_seq_len for longer rows)")
        check(self.model.vocab_size >= 262 or self.data.tokenizer != "byte", "model.vocab_size",
              self.model.vocab_size, "must be >= 262 for the built-in byte tokenizer")

    @property
    def vlm(self) -> VLMConfig:
        return VLMConfig(model=self.model, vision=self.vision, projector=self.projector)


def load_experiment(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment config, apply `a.b=value` overrides, validate everything that needs no
    file besides the YAML (`check_experiment` does the rest, once the number of processes is known)."""
    try:
        data = apply_overrides(load_yaml(path), list(overrides))
        return from_dict(ExperimentConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None


def training_data(exp: ExperimentConfig, world_size: int) -> DataConfig:
    """The data config the training loader runs with: several processes without data.steps_per_epoch
    stream resampled shards (every rank must run the same steps)."""
    if world_size > 1 and not exp.data.infinite:
        return replace(exp.data, resampled=True)
    return exp.data


def check_out_dir(t: TrainConfig) -> None:
    """train.out_dir is a folder, or can be made, and can be written."""
    out = Path(t.out_dir)
    check(not out.exists() or out.is_dir(), "train.out_dir", t.out_dir, "is a file, not a folder")
    existing = out.resolve()
    while not existing.exists():
        existing = existing.parent
    check(os.access(existing, os.W_OK | os.X_OK), "train.out_dir", t.out_dir, f"{existing} is not writable")


def check_experiment(exp: ExperimentConfig, world_size: int) -> Tokenizer:
    """Every check that needs the file system or the number of processes, run before anything is
    built: each failure is a ConfigError naming the field. Returns the loaded tokenizer."""
    t = exp.train
    check(world_size % t.ep_size == 0, "train.ep_size", t.ep_size,
          f"must divide the number of processes ({world_size})")
    if t.ep_size > 1:
        for name, moe in (("model.moe", exp.model.moe), ("model.concept_moe", exp.model.concept_moe)):
            if moe is None:
                continue
            check(moe.num_experts % t.ep_size == 0, f"{name}.num_experts", moe.num_experts,
                  f"must be divisible by train.ep_size = {t.ep_size}")
            check(moe.norm_topk_prob or moe.top_k == 1, f"{name}.norm_topk_prob", moe.norm_topk_prob,
                  "must be true with train.ep_size > 1 (DeepSpeed MoE renormalises the top-k gates)")
    user_deepspeed_config(t)
    if t.wandb:
        import importlib.util
        check(importlib.util.find_spec("wandb") is not None, "train.wandb", t.wandb,
              "needs the wandb package: pip install 'cmoe-vlm[wandb]' (or set train.wandb=false)")
    if t.precision == "bf16":
        import torch
        check(not torch.cuda.is_available() or torch.cuda.is_bf16_supported(), "train.precision", t.precision,
              "this GPU has no bf16 support; use fp32 (or auto)")
    check_data(training_data(exp, world_size), world_size)
    if t.heldout_shards:
        list_shards(t.heldout_shards, "train.heldout_shards")
    try:
        tokenizer = load_tokenizer(exp.data.tokenizer)
    except ConfigError as e:
        raise ConfigError(f"data.{e}") from None
    check(tokenizer.vocab_size <= exp.model.vocab_size or t.init_from, "model.vocab_size", exp.model.vocab_size,
          f"must be >= the tokenizer's vocabulary ({tokenizer.vocab_size}, data.tokenizer = {exp.data.tokenizer!r})")
    check_out_dir(t)
    if t.init_from:
        check((Path(t.init_from) / "config.json").is_file(), "train.init_from", t.init_from,
              "must be an export folder (config.json + model.safetensors): a run's <out_dir>/final, a converted "
              "model, or a checkpoint exported with python -m cmoe_vlm.training.checkpoint")
        init, out = Path(t.init_from).resolve(), Path(t.out_dir).resolve()
        check(out != init and init not in out.parents, "train.init_from", t.init_from,
              f"is or holds train.out_dir = {t.out_dir!r}: the run would write its config.json, checkpoints and "
              "final/ into the export it starts from; choose another train.out_dir")
    if exp.vision.backend == "transformers":
        tower_config(exp.vision.model_name)  # a ConfigError naming vision.model_name
    elif exp.vision.pretrained:
        check(Path(exp.vision.checkpoint_path).is_file(), "vision.checkpoint_path", exp.vision.checkpoint_path,
              "no such file")
    return tokenizer
