"""Perplexity over non-overlapping windows.

Protocol (reproducible in PyTorch): tokenize the whole file without special tokens, keep the first
`max_tokens` tokens, cut them into consecutive non-overlapping windows of `seq_len` tokens (the last one may be
shorter and is scored too if it has 2+ tokens), run each window on its own from an empty context, and score every
token but the first of each window. perplexity = exp(total NLL / number of scored tokens).

With `context_parallel` (Star Attention or ring attention over a mesh, `lizard_jax.distributed`), each window is
cut into blocks and scored through the context-parallel prefill (`score_context_parallel`): every block but the
last from its phase-1 logits (Star: the block's own view, [anchor, block]), the last block as the phase-2 query
over all earlier blocks (the global view). Ring attention is exact, so it scores as global attention does.
"""

from __future__ import annotations

import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from lizard_jax.cli import InputError
from lizard_jax.models import Transformer


def windows(ids: np.ndarray, seq_len: int, max_tokens: int | None = None):
    """-> (tokens [N, seq_len] int32, mask [N, seq_len] bool of scored targets at position t>=1)."""
    if seq_len < 2:
        raise InputError(f"seq_len must be >= 2, got {seq_len}")
    ids = np.asarray(ids, np.int32)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids) // seq_len
    rest = len(ids) - n * seq_len
    chunks = [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)]
    if rest >= 2:
        chunks.append(ids[n * seq_len:])
    if not chunks:
        raise InputError(f"need at least 2 tokens to score, got {len(ids)}")
    toks = np.zeros((len(chunks), seq_len), np.int32)
    mask = np.zeros((len(chunks), seq_len), bool)
    for i, c in enumerate(chunks):
        toks[i, : len(c)] = c
        mask[i, 1: len(c)] = True
    return toks, mask


@functools.partial(jax.jit, static_argnames=("model",))
def token_logprobs(model: Transformer, params, toks):
    """toks [B, T] -> (logp [B, T-1]: log p(toks[:, t+1] | toks[:, :t+1]) in fp32, greedy [B, T-1]: whether that
    token is the argmax)."""
    logits = model.apply({"params": params}, toks)[:, :-1].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    tgt = toks[:, 1:]
    return jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0], jnp.argmax(logits, axis=-1) == tgt


@functools.partial(jax.jit, static_argnames=("model",))
def _nll(model: Transformer, params, toks, mask):
    """Summed NLL of the masked targets of a batch of windows."""
    return -jnp.sum(jnp.where(mask[:, 1:], token_logprobs(model, params, toks)[0], 0.0))


def perplexity(model: Transformer, params, ids, *, seq_len: int = 1024, max_tokens: int | None = None,
               batch_size: int = 4, progress: bool = True, context_parallel: dict | None = None,
               mesh=None) -> dict:
    """Perplexity of `ids` (module docstring). `context_parallel`: None (global attention) or the options of
    `lizard_jax.distributed.score_context_parallel` (mode, block_size, anchor, anchor_size), run over `mesh`;
    the result then reports the resolved settings under "context_parallel"."""
    toks, mask = windows(ids, seq_len, max_tokens)
    nll, described = _nll, None
    if context_parallel is not None:
        from lizard_jax.distributed import score_context_parallel, scoring_options

        try:
            opts = scoring_options(mesh, model.cfg, seq_len, **context_parallel)
        except ValueError as e:  # the message names the option
            raise InputError(str(e)) from None
        n = mesh.shape[opts.axis]
        described = {"mode": opts.mode, "devices": n, "block_size": opts.block_size,
                     "blocks": seq_len // opts.block_size, "blocks_per_device": seq_len // (opts.block_size * n),
                     "anchor": opts.anchor if opts.mode == "star" else None, "anchor_size": opts.anchor_size}

        def nll(model, params, toks, mask):
            lengths = np.asarray(mask).sum(axis=1) + 1  # mask: targets 1..length-1
            logp = score_context_parallel(model, params, toks, lengths, mesh=mesh, **context_parallel)
            return -jnp.sum(jnp.where(mask[:, 1:], logp, 0.0))
    total, count = 0.0, int(mask.sum())
    pad = (-len(toks)) % batch_size  # full batches only: one compiled program
    toks = np.concatenate([toks, np.zeros((pad, seq_len), np.int32)])
    mask = np.concatenate([mask, np.zeros((pad, seq_len), bool)])
    bar = tqdm(total=count, unit="tok", desc="perplexity", file=sys.stderr, disable=not progress)
    for i in range(0, len(toks), batch_size):
        m = mask[i: i + batch_size]
        total += float(nll(model, params, jnp.asarray(toks[i: i + batch_size]), jnp.asarray(m)))
        bar.update(int(m.sum()))
    bar.close()
    out = {"task": "perplexity", "perplexity": math.exp(total / count), "tokens": count,
           "nll": total / count, "seq_len": seq_len, "windows": int(np.ceil(count / max(seq_len - 1, 1)))}
    return out if described is None else out | {"context_parallel": described}
