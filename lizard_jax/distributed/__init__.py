"""Context parallelism for long prompts: Star Attention and ring attention on a device mesh (shard_map).

    mesh = make_mesh({"context": jax.device_count()})
    out = generate_context_parallel(model, params, tokens, positions, key, mode="star", mesh=mesh,
                                    block_size=8192, max_new_tokens=32)

A left-padded prompt batch (`generate.left_pad`) is split into a context and a query: the query is the user's
question when it is given separately (`query_tokens` / `query_positions`, `[B, Q]` left-padded, positions
continuing each row's context: `generate(..., query=...)` builds them), else the last `query_size` prompt tokens
(the default when no split is given). The context is right-padded to a multiple of block_size x devices
and encoded along the mesh axis "context" (phase 1): by Star Attention (blocks with an anchor, no
communication; `star.py`) or by ring attention (exact global causal attention; `ring.py`). The query and every
generated token then attend over the sharded KV with an exact (output, log-sum-exp) merge (phase 2); only the
query host, the last device on the axis, stores their KV. With one block covering the context, Star equals
global attention; ring always does. On one device, Star's phase 1 is a block-parallel prefill whose attention
cost grows as T x (anchor + block) instead of T^2 / 2.

Other mesh axes (data, fsdp, tensor) replicate the computation; params may be sharded any way (shard_map
gathers them). Layers must be full softmax attention (no windows); other families are rejected.

Multi-host: start one process per host and call `jax.distributed.initialize()` first in each (coordinator
address, process count and id come from its arguments or the cluster environment, e.g. SLURM); build the mesh
from all processes' devices and load params onto it; call `generate_context_parallel` with the same prompts on
every process. The result is replicated, so every process gets the tokens:

    # on every host, e.g.  srun -N 4 python serve.py
    jax.distributed.initialize()
    mesh = make_mesh({"context": jax.device_count()})          # jax.devices(): every process's devices
    model, params, tokenizer = lizard_jax.load(ckpt, mesh)     # params placed by the sharding rules
    out = generate_context_parallel(model, params, tokens, positions, key, mode="star", mesh=mesh, ...)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lizard_jax.cli import InputError
from lizard_jax.distributed.common import AXIS
from lizard_jax.distributed.ring import ring_attention, zigzag_order
from lizard_jax.distributed.star import ShardedKVCache, context_attention, encode_context, target_logprobs
from lizard_jax.decode import SamplingConfig, decode_loop

__all__ = ["ContextParallel", "validate_context_parallel", "check_query", "prefill_context_parallel", "generate_context_parallel",
           "place_params", "scoring_options", "score_context_parallel",
           "encode_context", "context_attention", "ring_attention", "ShardedKVCache", "zigzag_order", "AXIS"]

MODES = ("star", "ring")
ANCHORS = ("first", "none")
BLOCK_ROUND = 64  # the default block size (context / devices) is rounded up to a multiple of this


@dataclasses.dataclass(frozen=True)
class ContextParallel:
    """Static options of context-parallel prefill and generation.

    mode: "star" (Star Attention) or "ring" (ring attention, exact).
    block_size: tokens per context block; None = context / devices (the paper's default), rounded up to 64.
      Ring shards are whole blocks too (C / devices tokens per device, two zigzag chunks), so it must be even.
    anchor: "first" (the first `anchor_size` context tokens prepended to every block) or "none"; Star only.
    anchor_size: None = block_size (the paper's default); at most block_size.
    query_size: without a separate query (`query_tokens`), the last `query_size` prompt tokens form the query,
      answered with exact global attention (phase 2); with one, unused (the query is what is given).
    axis: the mesh axis the context is sharded over.
    """

    mode: str
    block_size: int | None = None
    anchor: str = "first"
    anchor_size: int | None = None
    query_size: int = 64
    axis: str = AXIS

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"context_parallel must be one of {MODES}, got {self.mode!r}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {self.anchor!r}")
        if self.block_size is not None and (not isinstance(self.block_size, int) or self.block_size < 1):
            raise ValueError(f"block_size must be a positive int or None, got {self.block_size!r}")
        if self.mode == "ring" and self.block_size is not None and self.block_size % 2:
            raise ValueError(f"ring attention splits every device's shard into two zigzag chunks: block_size "
                             f"must be divisible by 2, got {self.block_size}")
        if self.anchor_size is not None:
            if self.mode == "ring" or self.anchor == "none":
                raise ValueError(f"anchor_size={self.anchor_size} given but no anchor is used "
                                 f"(mode={self.mode!r}, anchor={self.anchor!r})")
            if not isinstance(self.anchor_size, int) or self.anchor_size < 1:
                raise ValueError(f"anchor_size must be a positive int or None, got {self.anchor_size!r}")
            if self.block_size is not None and self.anchor_size > self.block_size:
                raise ValueError(f"anchor_size={self.anchor_size} is larger than a block "
                                 f"(block_size={self.block_size})")
        if not isinstance(self.query_size, int) or self.query_size < 1:
            raise ValueError(f"query_size must be a positive int, got {self.query_size!r}")

    def layout(self, prompt_len: int, devices: int, query: int | None = None) -> tuple[int, int, int, int]:
        """(query, block, anchor, context) sizes for a prompt width of `prompt_len` on `devices`: the last
        `query` columns are the query; the context is padded to `context`, a multiple of block x devices. With
        `query` (the width of a separately given query), the whole prompt is the context."""
        if query is None:
            query = min(self.query_size, prompt_len)
            ctx = max(prompt_len - query, 1)
        else:
            ctx = prompt_len
        block = self.block_size or -(-ctx // (devices * BLOCK_ROUND)) * BLOCK_ROUND
        anchor = 0 if self.mode == "ring" or self.anchor == "none" else (self.anchor_size or block)
        if anchor > block:
            raise ValueError(f"anchor_size={anchor} is larger than a block (block_size={block})")
        context = -(-ctx // (block * devices)) * block * devices
        return query, block, anchor, context


def validate_context_parallel(mesh: Mesh | None, cfg=None, **options) -> ContextParallel:
    """`ContextParallel(**options)` checked against `mesh` (it needs the options' axis, "context" by default)
    and, when given, the model config `cfg` (every layer must be full softmax attention). Raises ValueError."""
    opts = ContextParallel(**options)
    if mesh is None or opts.axis not in mesh.axis_names:
        axes = None if mesh is None else mesh.axis_names
        raise ValueError(f"context_parallel={opts.mode!r} needs a mesh with a {opts.axis!r} axis; got axes {axes} "
                         f"(e.g. lizard_jax.sharding.make_mesh({{{opts.axis!r}: jax.device_count()}}))")
    if cfg is not None:
        bad = [(i, s) for i, s in enumerate(cfg.attention)
               if s.kind != "softmax" or getattr(s, "window", None) is not None]
        if bad:
            raise ValueError(f"context parallelism needs full softmax attention in every layer; layers "
                             f"{[i for i, _ in bad]} are {sorted({repr(s) for _, s in bad})}")
    return opts


def split_prompt(tokens, positions, query: int, context: int, pad_id: int):
    """Left-padded tokens/positions `[B, P]` -> right-padded context `[B, context]` (token at its position,
    -1 positions on padding) and the query: the last `query` columns `[B, query]`."""
    b, width = tokens.shape
    c_tok, c_pos = tokens[:, :width - query], positions[:, :width - query]
    rows = jnp.arange(b)[:, None]
    slot = jnp.where(c_pos >= 0, c_pos, context)  # out of range -> dropped
    ctx_tok = jnp.full((b, context), pad_id, tokens.dtype).at[rows, slot].set(c_tok, mode="drop")
    ctx_pos = jnp.full((b, context), -1, jnp.int32).at[rows, slot].set(c_pos, mode="drop")
    return ctx_tok, ctx_pos, tokens[:, width - query:], positions[:, width - query:]


def check_query(tokens, positions, query_tokens, query_positions) -> None:
    """Raise `InputError` unless `query_tokens` / `query_positions` (both or neither) are integer `[B, Q]` arrays
    with the prompt's batch, every row holding at least one query token (position >= 0) and its query positions
    continuing its context: n, n + 1, ... after a context at positions 0..n-1 (padding: -1, at the row start)."""
    if query_tokens is None and query_positions is None:
        return
    if query_tokens is None or query_positions is None:
        raise InputError("query_tokens and query_positions go together: give both or neither")
    qt, qp, pos = np.asarray(query_tokens), np.asarray(query_positions), np.asarray(positions)
    for name, a in (("query_tokens", qt), ("query_positions", qp)):
        if not np.issubdtype(a.dtype, np.integer):
            raise InputError(f"{name} must hold integers (token ids / positions), got dtype {a.dtype}")
    if qt.ndim != 2 or qt.shape != qp.shape or qt.shape[0] != pos.shape[0]:
        raise InputError(f"query_tokens and query_positions must both be [batch, query] with the prompt's batch "
                         f"{pos.shape[0]}: {qt.shape=} {qp.shape=}")
    n_ctx = pos.max(axis=1) + 1
    for row in range(qp.shape[0]):
        real = qp[row] >= 0
        if not real.any():
            raise InputError(f"query of row {row} is empty: every row needs at least one query token")
        first = int(np.argmax(real))
        want = n_ctx[row] + np.arange(qp.shape[1] - first)
        if real[:first].any() or not np.array_equal(qp[row, first:], want):
            raise InputError(f"query_positions of row {row} must be -1 padding then {n_ctx[row]}, {n_ctx[row] + 1}, "
                             f"... (continuing its context of {n_ctx[row]} tokens), got {qp[row].tolist()}")


@functools.partial(jax.jit, static_argnames=("model", "opts", "mesh", "local"))
def _prefill(model, params, tokens, positions, query_tokens=None, query_positions=None, *, opts: ContextParallel,
             mesh: Mesh, local: int):
    n = mesh.shape[opts.axis]
    if query_tokens is None:
        query, block, anchor, context = opts.layout(tokens.shape[1], n)
        ctx_tok, ctx_pos, q_tok, q_pos = split_prompt(tokens, positions, query, context, model.cfg.pad_token_id)
    else:  # the whole prompt is the context
        query, block, anchor, context = opts.layout(tokens.shape[1], n, query=query_tokens.shape[1])
        ctx_tok, ctx_pos, _, _ = split_prompt(tokens, positions, 0, context, model.cfg.pad_token_id)
        q_tok, q_pos = query_tokens, query_positions
    caches = encode_context(model, params, ctx_tok, ctx_pos, mode=opts.mode, mesh=mesh, block_size=block,
                            anchor_size=anchor, local=query + local, axis=opts.axis)
    logits, caches = model.apply({"params": params}, q_tok, q_pos, caches)
    return caches, logits[:, -1]


@functools.partial(jax.jit, static_argnames=("model", "opts", "mesh", "max_new_tokens", "sampling", "eos_ids"))
def _generate(model, params, tokens, positions, key, query_tokens=None, query_positions=None, *,
              opts: ContextParallel, mesh: Mesh, max_new_tokens: int, sampling: SamplingConfig,
              eos_ids: tuple[int, ...]):
    caches, last_logits = _prefill(model, params, tokens, positions, query_tokens, query_positions, opts=opts,
                                   mesh=mesh, local=max_new_tokens)
    step_fn = lambda tok, pos, caches: model.apply({"params": params}, tok, pos, caches)
    last = jnp.max(positions if query_positions is None else query_positions, axis=1)
    return decode_loop(step_fn, caches, last_logits, last, key,
                       max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=eos_ids)


def _replicated(mesh: Mesh, x):
    """A host value (the same on every process) as an array replicated over `mesh` (works multi-host)."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P()), np.asarray(x))


def place_params(params, mesh: Mesh):
    """Leaves of `params` that live on devices other than `mesh`'s are replicated onto the mesh (a copy; place
    params on the mesh once, e.g. `lizard_jax.load(ckpt, mesh)`, to avoid it); leaves on the mesh stay."""
    devices = set(mesh.devices.flat)
    on_mesh = lambda x: isinstance(x, jax.Array) and set(x.sharding.device_set) == devices
    return jax.tree_util.tree_map(lambda x: x if on_mesh(x) else jax.device_put(x, NamedSharding(mesh, P())),
                                  params)


def _query_args(mesh, tokens, positions, query_tokens, query_positions) -> tuple:
    check_query(tokens, positions, query_tokens, query_positions)
    if query_tokens is None:
        return ()
    return (_replicated(mesh, np.asarray(query_tokens, np.int32)), _replicated(mesh, np.asarray(query_positions,
                                                                                               np.int32)))


def prefill_context_parallel(model, params, tokens, positions, *, mode: str, mesh: Mesh, block_size: int | None = None,
                             anchor_size: int | None = None, anchor: str = "first", query_size: int = 64,
                             local: int = 0, query_tokens=None,
                             query_positions=None) -> tuple[tuple[ShardedKVCache, ...], Any]:
    """Context-parallel prefill of left-padded `tokens`/`positions [B, P]`: (per-layer sharded caches with
    `query + local` free slots on the query host, last-token logits `[B, vocab]` float32). The query is
    `query_tokens`/`query_positions [B, Q]` when given (the whole prompt is then the context; see
    `check_query`), else the last `query_size` prompt tokens. Params off the mesh are replicated onto it
    (`place_params`)."""
    opts = validate_context_parallel(mesh, model.cfg, mode=mode, block_size=block_size, anchor=anchor,
                                     anchor_size=anchor_size, query_size=query_size)
    query = _query_args(mesh, tokens, positions, query_tokens, query_positions)
    return _prefill(model, place_params(params, mesh), _replicated(mesh, tokens), _replicated(mesh, positions),
                    *query, opts=opts, mesh=mesh, local=local)


def generate_context_parallel(model, params, tokens, positions, key, *, mode: str, mesh: Mesh,
                              block_size: int | None = None, anchor_size: int | None = None, anchor: str = "first",
                              query_size: int = 64, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                              eos_ids: tuple[int, ...] = (), query_tokens=None, query_positions=None):
    """Generate from left-padded `tokens`/`positions [B, P]` (as `generate.left_pad` makes) with context
    parallelism over `mesh`'s "context" axis. Returns tokens `[B, max_new_tokens]` int32, -1 after a row's EOS
    (the convention of `generate._generate`). The query (phase 2) is `query_tokens`/`query_positions [B, Q]`
    when given (the prompt is then all context; see `check_query`), else the last `query_size` prompt tokens.
    See `ContextParallel` for the options; params off the mesh are replicated onto it (`place_params`)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    opts = validate_context_parallel(mesh, model.cfg, mode=mode, block_size=block_size, anchor=anchor,
                                     anchor_size=anchor_size, query_size=query_size)
    query = _query_args(mesh, tokens, positions, query_tokens, query_positions)
    return _generate(model, place_params(params, mesh), _replicated(mesh, tokens), _replicated(mesh, positions), key,
                     *query, opts=opts, mesh=mesh, max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=tuple(eos_ids))


# ------------------------------------------------------------------------------------- scoring (perplexity)


def scoring_options(mesh: Mesh, cfg, seq_len: int, *, mode: str, block_size: int | None = None,
                    anchor: str = "first", anchor_size: int | None = None) -> ContextParallel:
    """`validate_context_parallel`'s options for scoring windows of `seq_len` tokens, with the block size
    (default: seq_len / devices) and the Star anchor size (default: the block size) resolved. seq_len must be a
    multiple of block_size x devices: every block is whole. Raises ValueError."""
    opts = validate_context_parallel(mesh, cfg, mode=mode, block_size=block_size, anchor=anchor,
                                     anchor_size=anchor_size)
    n = mesh.shape[opts.axis]
    block = opts.block_size or max(seq_len // n, 1)
    if seq_len % (block * n):
        raise ValueError(f"seq_len {seq_len} is not a multiple of block_size x devices = {block} x {n}: the windows "
                         f"must split into whole blocks")
    star_anchor = mode == "star" and anchor == "first"
    return dataclasses.replace(opts, block_size=block, anchor_size=(anchor_size or block) if star_anchor else None)


@functools.partial(jax.jit, static_argnames=("model", "opts", "mesh"))
def _score(model, params, tokens, lengths, *, opts: ContextParallel, mesh: Mesh):
    b, t = tokens.shape
    block = opts.block_size
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))  # padding after a row's end: harmless
    targets = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)  # the last column is never scored
    caches, logp1 = encode_context(model, params, tokens, positions, mode=opts.mode, mesh=mesh, block_size=block,
                                   anchor_size=opts.anchor_size or 0, local=block, axis=opts.axis, targets=targets)
    # phase 2: the block holding a row's last prediction (position length - 2) is the query; its own phase-1 KV
    # and the blocks after it leave the cache (position -1), the query's KV goes to the query host's local slots
    start = jnp.maximum(lengths - 2, 0) // block * block  # [B]
    caches = tuple(c.replace(pos=jnp.where(c.pos >= start[:, None], -1, c.pos)) for c in caches)
    q_pos = start[:, None] + jnp.arange(block, dtype=jnp.int32)
    logits, _ = model.apply({"params": params}, jnp.take_along_axis(tokens, q_pos, axis=1), q_pos, caches)
    logp2 = target_logprobs(logits, jnp.take_along_axis(targets, q_pos, axis=1))
    rel = jnp.arange(t)[None] - start[:, None]
    logp = jnp.where(rel >= 0, jnp.take_along_axis(logp2, jnp.clip(rel, 0, block - 1), axis=1), logp1)
    return logp[:, :-1]


def score_context_parallel(model, params, tokens, lengths=None, *, mesh: Mesh, mode: str,
                           block_size: int | None = None, anchor: str = "first", anchor_size: int | None = None):
    """Log-probs `[B, T-1]` float32 of tokens[:, t+1] given tokens[:, :t+1] (as `eval.perplexity.token_logprobs`)
    through a context-parallel prefill of right-padded windows `tokens [B, T]` (`lengths [B]`: real tokens per
    row; None = T). Each window is cut into blocks of `block_size` laid out along the mesh axis (see
    `scoring_options`) and encoded by phase 1 (`encode_context`): the predictions of every block but the row's
    last are its phase-1 logits (Star: attention within [anchor, block] at global positions, block 0 alone;
    ring: exact). The last block (the one holding the prediction of the row's last token) is the phase-2 query:
    causal over itself and attending to every earlier block's phase-1 KV (the global view). With one block per
    window, or with ring attention, this equals global attention. Params off the mesh are replicated onto it."""
    opts = scoring_options(mesh, model.cfg, tokens.shape[1], mode=mode, block_size=block_size, anchor=anchor,
                           anchor_size=anchor_size)
    lengths = np.full(tokens.shape[0], tokens.shape[1]) if lengths is None else lengths
    return _score(model, place_params(params, mesh), _replicated(mesh, np.asarray(tokens, np.int32)),
                  _replicated(mesh, np.asarray(lengths, np.int32)), opts=opts, mesh=mesh)
