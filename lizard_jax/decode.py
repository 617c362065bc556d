"""The decode loop shared by every generation front end: sampling and one jitted `lax.while_loop`.

It sits below `lizard_jax.generate` and its context-parallel (`distributed`) and pruned-prefill (`lazy`) paths,
which differ only in how they prefill and what `step_fn` runs one token through.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits, key, sampling: SamplingConfig):
    """logits [B, V] float32 -> token ids [B]."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        keep_sorted = jnp.cumsum(probs, axis=-1) - probs < sampling.top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def decode_loop(step_fn, caches, last_logits, last_pos, key, *, max_new_tokens: int, sampling: SamplingConfig,
                eos_ids: tuple[int, ...]):
    """Sample up to `max_new_tokens` tokens in one `lax.while_loop` (call inside jit).

    step_fn(tok [B, 1], pos [B, 1], caches) -> (logits [B, 1, V], caches) runs the model on one token;
    last_logits [B, V] are the prompt's last logits and last_pos [B] its last positions.
    Returns tokens [B, max_new_tokens] int32, -1 after a row's EOS.
    """
    b = last_logits.shape[0]
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def cond(state):
        step, _, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, last_logits, caches, pos, done, out, key = state
        key, sub = jax.random.split(key)
        tok = sample(last_logits, sub, sampling)
        tok = jnp.where(done, eos[0], tok)
        out = out.at[:, step].set(jnp.where(done, -1, tok))
        done = done | jnp.isin(tok, eos)
        pos = pos + 1
        logits, caches = step_fn(tok[:, None], pos[:, None], caches)
        return step + 1, logits[:, -1], caches, pos, done, out, key

    out = jnp.full((b, max_new_tokens), -1, jnp.int32)
    state = (jnp.int32(0), last_logits, caches, last_pos, jnp.zeros((b,), bool), out, key)
    return jax.lax.while_loop(cond, body, state)[5]
