"""LazyLLM (arXiv 2407.14057): dynamic token pruning with an Aux Cache, for a faster time to first token.

A schedule names its pruning layers (`LazyConfig(layers=..., keep=...)`, or `LazyConfig.default(num_layers)`,
the measured default); `decode` picks what decoding attends to ("attend_all", the default, or "paper"). On a tiny
random model (a real one comes from `lizard_jax.load`):

    >>> import jax
    >>> from lizard_jax.config import ModelConfig
    >>> from lizard_jax.generate import SamplingConfig, left_pad
    >>> from lizard_jax.lazy import LazyConfig, generate_lazy
    >>> from lizard_jax.models import Transformer, init_params
    >>> cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
    ...                   ffn_dim=64)
    >>> model, params = Transformer(cfg), init_params(cfg, jax.random.key(0))
    >>> LazyConfig.default(cfg.num_layers)
    LazyConfig(layers=(2,), keep=(0.1,), top_k=(), bucket=64, sink_tokens=0, recent_tokens=0, pool=1, revive_buckets=(16, 128, 1024), decode='attend_all')
    >>> lazy = LazyConfig(layers=(1, 2), keep=(0.5, 0.25), bucket=8, decode="paper")
    >>> tokens, positions = left_pad([list(range(2, 50)), list(range(5, 30))], cfg.pad_token_id, bucket=16)
    >>> out = generate_lazy(model, params, tokens, positions, jax.random.key(1), lazy=lazy, max_new_tokens=4,
    ...                     sampling=SamplingConfig(), eos_ids=())
    >>> out.shape
    (2, 4)

`prune.py` is the fast path (gathers of kept tokens, static shapes, revival during decoding), `reference.py` the
masked spec of the pruned prefill, `config.py` the schedule. `tests/test_lazy.py` runs the example above.
"""

from lizard_jax.lazy.config import LazyConfig
from lizard_jax.lazy.prune import LazyState, generate_lazy, last_query_scores, lazy_logprobs, lazy_prefill
from lizard_jax.lazy.reference import prefill_reference

__all__ = ["LazyConfig", "LazyState", "generate_lazy", "lazy_prefill", "lazy_logprobs", "last_query_scores",
           "prefill_reference"]
