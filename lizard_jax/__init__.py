"""lizard_jax: linearize, hybridize and serve long-context LLMs in JAX/Flax with Pallas kernels.

    model, params, tokenizer = lizard_jax.load("ckpt/smollm2")
    out = lizard_jax.generate(model, params, ["Hello"], tokenizer=tokenizer, max_new_tokens=20)
"""

from lizard_jax.checkpoint import load
from lizard_jax.config import ModelConfig
from lizard_jax.generate import generate

__all__ = ["load", "generate", "ModelConfig"]
