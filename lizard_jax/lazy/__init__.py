"""LazyLLM (arXiv 2407.14057): dynamic token pruning with an Aux Cache, for a faster time to first token.

    from lizard_jax.lazy import LazyConfig, generate_lazy
    out = generate_lazy(model, params, tokens, positions, key, lazy=LazyConfig(), max_new_tokens=32,
                        sampling=SamplingConfig(), eos_ids=(2,))

`prune.py` is the fast path (gathers of kept tokens, static shapes, revival during decoding), `reference.py` the
masked spec of the pruned prefill, `config.py` the schedule.
"""

from lizard_jax.lazy.config import LazyConfig
from lizard_jax.lazy.prune import LazyState, generate_lazy, last_query_scores, lazy_logprobs, lazy_prefill
from lizard_jax.lazy.reference import prefill_reference

__all__ = ["LazyConfig", "LazyState", "generate_lazy", "lazy_prefill", "lazy_logprobs", "last_query_scores",
           "prefill_reference"]
