"""Training configuration: one YAML file (`train.py --config`), every section a frozen dataclass, unknown keys
rejected with their name. `--set a.b=value` overrides any field."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from lizard_jax.config import ConfigError, from_dict, to_dict


def _require(ok: bool, key: str, want: str, value) -> None:
    """One range check: field `key` must be `want` (written as `ok`, so that a NaN fails it too)."""
    if not ok:
        raise ConfigError(f"{key} must be {want}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """source: "text" (plain files; documents split at blank lines), "jsonl" (one JSON object a line; `text_key`
    or a `template` like "{instruction}\\n{output}"), or "tfds" (a TensorFlow Datasets name, streamed in order).
    Documents are tokenized, joined with EOS and packed into sequences of `seq_len` (+1 for the target).

    segment_ids: packed documents kept apart. True: each batch carries segment ids and per-document positions
      (`train.data`), so no token attends to (or carries state from) the previous document in its row, RoPE
      restarts with each document, and the losses never score a document's first token from the previous one.
      False: the rows are one stream across documents (what every run did before the option). Default true for
      new configs: measured on the CPU (configs/lizard_tiny.yaml stage 1, benchmarks/RESULTS.md "Packed
      documents") it does not hurt: WikiText-2 perplexity 84.11 with, 84.45 without.
    """

    source: str = "text"
    paths: tuple[str, ...] = ()
    tfds_name: str | None = None
    tfds_split: str = "train"
    tfds_data_dir: str | None = None
    text_key: str = "text"
    template: str | None = None
    seq_len: int = 512
    batch_size: int = 8
    shuffle: bool = True
    max_tokens: int | None = None
    segment_ids: bool = True

    def __post_init__(self):
        _require(isinstance(self.segment_ids, bool), "segment_ids", "true or false", self.segment_ids)
        if self.source not in ("text", "jsonl", "tfds"):
            raise ConfigError(f"data.source must be text, jsonl or tfds, got {self.source!r}")
        if self.source in ("text", "jsonl") and not self.paths:
            raise ConfigError(f"data.paths is empty for source {self.source!r}")
        if self.source == "tfds" and not self.tfds_name:
            raise ConfigError("data.tfds_name is required for source 'tfds'")
        _require(self.seq_len >= 2, "seq_len", ">= 2 (a token to predict from and one to predict)", self.seq_len)
        _require(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        _require(self.max_tokens is None or self.max_tokens >= 2, "max_tokens", "null or >= 2", self.max_tokens)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")

    def __post_init__(self):
        _require(self.rank >= 1, "rank", ">= 1", self.rank)
        _require(self.alpha > 0, "alpha", "> 0", self.alpha)
        allowed = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        bad = set(self.targets) - allowed
        if bad:
            raise ConfigError(f"lora.targets: unknown {sorted(bad)}; allowed: {sorted(allowed)}")


TRAIN_SCOPES = ("new", "converted_layers", "all", "lora", "lora_only")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One training stage. stage 1 (attention transfer): `loss` "mse" between student and teacher attention
    outputs per converted layer (+ `kd_weight` x KL of the whole student's logits to the teacher's). stage 2
    (fine-tuning): next-token cross-entropy (+ `kd_weight` x KL to the teacher's logits).

    train: which parameters the stage trains (the rest stay as they are):
      "new"               the student's new parameters (gates, norms, feature maps...);
      "converted_layers"  every parameter of the converted attention layers (teacher q/k/v/o included) and the
                          new ones (SALA's stage 1);
      "all"               every parameter;
      "lora"              LoRA on `lora.targets` of the converted layers plus the new parameters (stage 2 only).
      "lora_only"         LoRA only, every other parameter as stage 1 left it (the Lizard paper's stage 2).
      None (default)      stage 1 "new"; stage 2 "lora" when `lora` is given, else "new".

    mix_lr_mult: learning-rate multiplier for the Lizard layers' branch-mixing scalars (params `alpha` and
      `gate_scale` = beta in Y = beta * Y_gate + alpha * Y_anchor): their AdamW update (weight decay included) is
      scaled by it, i.e. they train at lr x mix_lr_mult. 1.0 (default): no scaling, the optimizer as before the
      option; 0.0 freezes them. Needs a Lizard student when not 1.0.
    """

    steps: int = 0
    lr: float = 1e-3
    warmup: float = 0.1
    end_lr_factor: float = 0.0
    loss: str = "mse"
    lora: LoraConfig | None = None
    kd_weight: float = 0.0
    kd_temperature: float = 1.0
    seq_len: int | None = None
    batch_size: int | None = None
    train: str | None = None
    mix_lr_mult: float = 1.0

    def __post_init__(self):
        _require(self.mix_lr_mult >= 0 and math.isfinite(self.mix_lr_mult), "mix_lr_mult", ">= 0 and finite",
                 self.mix_lr_mult)
        _require(self.steps >= 0, "steps", ">= 0", self.steps)
        _require(self.lr > 0, "lr", "> 0", self.lr)
        _require(0 <= self.warmup <= 1, "warmup", "in [0, 1] (a fraction of the steps)", self.warmup)
        _require(0 <= self.end_lr_factor <= 1, "end_lr_factor", "in [0, 1]", self.end_lr_factor)
        _require(self.kd_weight >= 0, "kd_weight", ">= 0", self.kd_weight)
        _require(self.kd_temperature > 0, "kd_temperature", "> 0", self.kd_temperature)
        _require(self.seq_len is None or self.seq_len >= 2, "seq_len", "null or >= 2", self.seq_len)
        _require(self.batch_size is None or self.batch_size >= 1, "batch_size", "null or >= 1", self.batch_size)
        if self.loss not in ("mse", "smooth_l1"):
            raise ConfigError(f"stage.loss must be mse or smooth_l1, got {self.loss!r}")
        if self.train not in (None, *TRAIN_SCOPES):
            raise ConfigError(f"stage.train must be one of {TRAIN_SCOPES} or null, got {self.train!r}")
        if self.train in ("lora", "lora_only") and self.lora is None:
            raise ConfigError(f"stage.train {self.train!r} needs a lora section")
        if self.lora is not None and self.train not in (None, "lora", "lora_only"):
            raise ConfigError(f"stage.lora is given but stage.train is {self.train!r}: LoRA would be unused")

    def scope(self, index: int) -> str:
        """The resolved `train` of stage `index` (1 or 2)."""
        if self.train is not None:
            return self.train
        return "lora" if index == 2 and self.lora is not None else "new"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip: float = 1.0

    def __post_init__(self):
        for name in ("b1", "b2"):
            _require(0 <= getattr(self, name) < 1, name, "in [0, 1)", getattr(self, name))
        _require(self.eps > 0, "eps", "> 0", self.eps)
        _require(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        _require(self.clip > 0, "clip", "> 0 (the global gradient norm clip)", self.clip)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        _require(self.every >= 1, "every", ">= 1 (steps between checkpoints)", self.every)
        _require(self.keep >= 1, "keep", ">= 1", self.keep)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The run's closing summary: teacher and student perplexity on the same tokens (the first `max_tokens` of
    `text`, windows of `seq_len`, as `eval.py perplexity`) and the decode state each keeps at `seq_len` tokens;
    printed with `note` and written to run_dir/summary.json."""

    text: str
    max_tokens: int = 4096
    seq_len: int = 1024
    batch_size: int = 4
    note: str | None = None

    def __post_init__(self):
        _require(self.max_tokens >= 2, "max_tokens", ">= 2", self.max_tokens)
        _require(self.seq_len >= 2, "seq_len", ">= 2 (a token to predict from and one to predict)", self.seq_len)
        _require(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    """The recipe: `attention` in `lizard_jax.recipes.student_config` format."""

    attention: Any = None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    teacher: str = "smollm2"
    run_dir: str = "runs/default"
    seed: int = 0
    dtype: str = "bfloat16"
    remat: bool = False
    student: StudentConfig = StudentConfig()
    data: DataConfig | None = None
    mesh: Any = None
    stage1: StageConfig = StageConfig()
    stage2: StageConfig = StageConfig(lr=5e-4, loss="mse")
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log_every: int = 10
    export: str | None = None
    eval: EvalConfig | None = None
    distributed: bool = False

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.data is None:
            raise ConfigError("the data section is required")
        if self.student.attention is None:
            raise ConfigError("student.attention (the recipe's attention schedule) is required")
        if self.mesh is not None and not (isinstance(self.mesh, dict) and all(
                isinstance(n, int) and not isinstance(n, bool) and (n >= 1 or n == -1) for n in self.mesh.values())):
            raise ConfigError(f"mesh must be a mapping of axis -> size (>= 1, or -1 for the rest), got {self.mesh!r}")
        _require(self.seed >= 0, "seed", ">= 0", self.seed)
        _require(self.log_every >= 1, "log_every", ">= 1", self.log_every)
        if self.stage1.lora is not None:
            raise ConfigError("stage1.lora / stage1.train 'lora' is not supported: LoRA trains in stage 2")

    @classmethod
    def from_dict(cls, data) -> "TrainConfig":
        return from_dict(cls, data)

    def to_dict(self):
        return to_dict(self)
