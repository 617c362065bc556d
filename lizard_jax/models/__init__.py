from lizard_jax.models.transformer import Transformer, abstract_params, init_caches, init_params

__all__ = ["Transformer", "abstract_params", "init_caches", "init_params"]
