"""Two-stage distillation (attention transfer, then LoRA fine-tuning) behind `train.py`."""

from lizard_jax.train.config import TrainConfig
from lizard_jax.train.loop import Trainer

__all__ = ["TrainConfig", "Trainer"]
