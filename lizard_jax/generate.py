"""Batched generation with a fixed-size cache: left-padded prompts, jitted prefill and decode loop.

`generate(model, params, prompts, ...)` takes strings (with a tokenizer) or token-id lists. Prompts are
left-padded to a common length bucket (so a bounded number of programs compiles); pad tokens get position -1
and are invisible to attention. Decoding runs in one `lax.while_loop` that stops when every row hit EOS or
`max_new_tokens` is reached. Greedy when `temperature == 0`, else temperature + nucleus (top-p) sampling.
`context_parallel="star" | "ring"` routes to `lizard_jax.distributed` (a long prompt split over a device mesh),
`prefill="lazy"` to `lizard_jax.lazy` (LazyLLM token pruning); the default path is the plain jitted one.
`query=` gives each prompt's question separately: Star and ring answer it in phase 2 (global attention over
every block), the other paths simply read it after the prompt.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lizard_jax.cli import InputError
from lizard_jax.decode import SamplingConfig, decode_loop, sample  # noqa: F401  (public here too)
from lizard_jax import distributed, lazy as lazyllm
from lizard_jax.models import Transformer, init_caches

PAD_BUCKET = 64
PREFILLS = ("full", "lazy")


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt, EOS excluded
    texts: list[str] | None
    prompt_lengths: list[int]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, bucket: int = PAD_BUCKET):
    """Token lists -> (tokens [B, P] int32, positions [B, P] int32 with -1 on padding), P a bucket multiple."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    width = -(-longest // bucket) * bucket
    toks = np.full((len(prompts), width), pad_id, np.int32)
    pos = np.full((len(prompts), width), -1, np.int32)
    for i, p in enumerate(prompts):
        toks[i, width - len(p):] = p
        pos[i, width - len(p):] = np.arange(len(p))
    return jnp.asarray(toks), jnp.asarray(pos)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "eos_ids", "cache_len",
                                             "padded"))
def _generate(model: Transformer, params, tokens, positions, key, *, max_new_tokens: int,
              sampling: SamplingConfig, eos_ids: tuple[int, ...], cache_len: int, padded: bool = True):
    caches = init_caches(model.cfg, tokens.shape[0], cache_len)
    # an unpadded batch prefills with positions=None: softmax layers take the fast self-attention path
    logits, caches = model.apply({"params": params}, tokens, positions if padded else None, caches)
    step_fn = lambda tok, pos, caches: model.apply({"params": params}, tok, pos, caches)
    return decode_loop(step_fn, caches, logits[:, -1], jnp.max(positions, axis=1), key,
                       max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=eos_ids)


def encode_prompts(prompts, tokenizer=None, chat: bool = False) -> list[list[int]]:
    """Strings (through `tokenizer`, optionally its chat template) or token-id lists -> token-id lists."""
    if isinstance(prompts, (str, bytes)) or (len(prompts) and isinstance(prompts[0], int)):
        raise ValueError("prompts must be a list of strings or a list of token-id lists")
    ids = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("string prompts need a tokenizer")
            if chat:
                p = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                  add_generation_prompt=True)
            ids.append(tokenizer(p, add_special_tokens=not chat)["input_ids"])
        else:
            ids.append([int(t) for t in p])
    return ids


def encode_queries(queries, n_prompts: int, tokenizer=None, chat: bool = False) -> list[list[int]]:
    """`generate`'s `query=`: one question per prompt, strings (through `tokenizer`, no special tokens: it
    continues the prompt) or token-id sequences (an integer array `[B, Q]` works too) -> token-id lists.
    Raises `InputError` for a count that differs from the prompts', an empty query, non-integer ids or `chat`."""
    if chat:
        raise InputError("query= cannot be combined with chat=True (the chat template wraps the whole user turn; "
                         "put the question in the prompt instead)")
    if isinstance(queries, (str, bytes)):
        raise InputError("query must be a list with one question per prompt, got a single string")
    if isinstance(queries, np.ndarray) or isinstance(queries, jax.Array):
        queries = np.asarray(queries)
        if queries.ndim != 2 or not np.issubdtype(queries.dtype, np.integer):
            raise InputError(f"a query array must be integer token ids [prompts, query], got shape {queries.shape} "
                             f"dtype {queries.dtype}")
    if len(queries) != n_prompts:
        raise InputError(f"query has {len(queries)} entries for {n_prompts} prompts: give one per prompt")
    ids = []
    for i, q in enumerate(queries):
        if isinstance(q, str):
            if tokenizer is None:
                raise InputError("string queries need a tokenizer")
            q = tokenizer(q, add_special_tokens=False)["input_ids"]
        elif isinstance(q, (int, np.integer)) or not hasattr(q, "__len__"):
            raise InputError(f"query {i} must be a string or a sequence of token ids, got {type(q).__name__}")
        bad = [t for t in q if not isinstance(t, (int, np.integer)) or isinstance(t, bool)]
        if bad:
            raise InputError(f"query {i} must hold integer token ids, got {bad[0]!r}")
        if len(q) == 0:
            raise InputError(f"query {i} is empty: a query needs at least one token")
        ids.append([int(t) for t in q])
    return ids


def query_arrays(prompt_ids: list[list[int]], query_ids: list[list[int]], pad_id: int, bucket: int = 16):
    """Left-padded query tokens/positions `[B, Q]` (Q a multiple of `bucket`), each row's positions continuing
    its prompt's: what `distributed.generate_context_parallel(query_tokens=, query_positions=)` takes."""
    toks, pos = left_pad(query_ids, pad_id, bucket=bucket)
    offset = jnp.asarray([len(p) for p in prompt_ids], jnp.int32)[:, None]
    return toks, jnp.where(pos >= 0, pos + offset, -1)


def check_generate_options(*, context_parallel=None, mesh=None, block_size=None, anchor_size=None,
                           anchor: str = "first", prefill: str = "full", lazy=None) -> None:
    """Raise ValueError for inconsistent `generate` options: an unknown prefill, lazy options without
    prefill="lazy", context-parallel options without context_parallel, lazy prefill with context parallelism.
    (The context-parallel values themselves are checked by `distributed.validate_context_parallel`.)"""
    if prefill not in PREFILLS:
        raise ValueError(f"prefill must be one of {PREFILLS}, got {prefill!r}")
    if lazy is not None and prefill != "lazy":
        raise ValueError(f"lazy={lazy!r} needs prefill='lazy', got prefill={prefill!r}")
    if context_parallel is None:
        given = [name for name, v in (("mesh", mesh), ("block_size", block_size), ("anchor_size", anchor_size))
                 if v is not None] + (["anchor"] if anchor != "first" else [])
        if given:
            raise ValueError(f"{', '.join(given)} given without context_parallel ('star' or 'ring')")
    elif prefill == "lazy":
        raise ValueError(f"prefill='lazy' cannot be combined with context_parallel={context_parallel!r} "
                         f"(LazyLLM prunes a single-device prefill)")


def _to_host(x) -> np.ndarray:
    """A device array -> numpy; one spread over several processes (multi-host meshes) is gathered first."""
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def generate(model: Transformer, params, prompts, *, tokenizer=None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True,
             chat: bool = False, context_parallel: str | None = None, mesh=None, block_size: int | None = None,
             anchor_size: int | None = None, anchor: str = "first", prefill: str = "full",
             lazy=None, query=None) -> GenerationResult:
    """Generate continuations of `prompts` (strings need `tokenizer`; or lists of token ids).

    `chat=True` wraps string prompts in the tokenizer's chat template as a user turn.
    `context_parallel="star" | "ring"`: the prompt is split over `mesh`'s "context" axis (Star Attention or ring
    attention; `block_size`, `anchor_size`, `anchor="first" | "none"` as in `distributed.ContextParallel`; params
    are replicated onto the mesh unless already on it). `prefill="lazy"`: LazyLLM pruned prefill and decoding
    with `lazy` (a `lazy.LazyConfig`; default `LazyConfig.default(num_layers)`). Same result type either way.
    `query`: one question per prompt (strings, or token-id lists; see `encode_queries`) that follows it. With
    context parallelism it is the phase-2 query (Star: it attends to every block through the distributed
    softmax) and the whole prompt is the context; without a query the last `query_size` (64) prompt tokens are.
    The other paths read prompt + query as one prompt. `prompt_lengths` count the prompt only.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_generate_options(context_parallel=context_parallel, mesh=mesh, block_size=block_size,
                           anchor_size=anchor_size, anchor=anchor, prefill=prefill, lazy=lazy)
    if query is not None and chat:
        encode_queries(query, 0, chat=True)  # raises: the chat template wraps the whole turn
    ids = encode_prompts(prompts, tokenizer, chat)
    q_ids = None if query is None else encode_queries(query, len(ids), tokenizer, chat)
    cfg = model.cfg
    split = {}
    if q_ids is not None and context_parallel is not None:
        split = dict(zip(("query_tokens", "query_positions"), query_arrays(ids, q_ids, cfg.pad_token_id)))
        tokens, positions = left_pad(ids, cfg.pad_token_id)
    else:
        tokens, positions = left_pad(ids if q_ids is None else [p + q for p, q in zip(ids, q_ids)], cfg.pad_token_id)
    eos = tuple(cfg.eos_token_ids) if stop_at_eos else ()
    if stop_at_eos and tokenizer is not None and tokenizer.eos_token_id is not None and not eos:
        eos = (int(tokenizer.eos_token_id),)
    sampling = SamplingConfig(temperature, top_p)
    key = jax.random.key(seed)
    if context_parallel is not None:
        out = distributed.generate_context_parallel(
            model, params, tokens, positions, key, mode=context_parallel, mesh=mesh, block_size=block_size,
            anchor_size=anchor_size, anchor=anchor, max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=eos,
            **split)
    elif prefill == "lazy":
        out = lazyllm.generate_lazy(model, params, tokens, positions, key,
                                    lazy=lazy or lazyllm.LazyConfig.default(cfg.num_layers),
                                    max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=eos)
    else:
        out = _generate(model, params, tokens, positions, key, max_new_tokens=max_new_tokens, sampling=sampling,
                        eos_ids=eos, cache_len=tokens.shape[1] + max_new_tokens, padded=bool(np.any(positions < 0)))
    out = _to_host(out)
    gen = [[int(t) for t in row if t >= 0 and t not in eos] for row in out]
    texts = [tokenizer.decode(g, skip_special_tokens=True) for g in gen] if tokenizer is not None else None
    return GenerationResult(gen, texts, [len(i) for i in ids])
