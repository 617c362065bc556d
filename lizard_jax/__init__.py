"""lizard_jax: linearize, hybridize and serve long-context LLMs in JAX/Flax with Pallas kernels.

    model, params, tokenizer = lizard_jax.load("ckpt/smollm2")
    out = lizard_jax.generate(model, params, ["Hello"], tokenizer=tokenizer, max_new_tokens=20)
"""

# first: the layer files register their attention specs, which every ModelConfig needs (see config.py)
from lizard_jax import layers  # noqa: F401  isort: skip
from lizard_jax.config import ModelConfig
from lizard_jax.generate import generate
from lizard_jax.loading import load

__all__ = ["load", "generate", "ModelConfig"]
