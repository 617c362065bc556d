"""Star Attention (arXiv 2411.17116) and the context-sharded KV cache that Star and ring attention share.

Phase 1, context encoding (`encode_context`, mode "star"): the context `[B, C]` (right-padded, C a multiple of
block_size x devices) is cut into blocks laid out contiguously along the mesh axis "context"; a device encodes
its blocks as one batch of rows. Each block attends causally within [anchor, block] (the anchor: the first
`anchor_size` context tokens) with global position ids, and only the block's own KV is kept. The anchor's
hidden states are the same in every row (anchor tokens attend only to the anchor), so a device runs the anchor
through each layer once and every block row reuses its q/k/v: projections and MLP run on anchor + own blocks
tokens, only attention runs on [anchor, block] rows (exactly the paper's per-block computation, without its
recomputation of the anchor per block). Block 0 is the anchor's own block: its row is [block 0, padding] so it
never sees the anchor twice. Positions increase along every row and padding sits at row ends, so a causal mask
by index is exact (cuDNN applies on a GPU). Mode "ring" encodes the same context with exact global causal
attention instead (`ring.py`, zigzag layout). Devices do not communicate in Star's phase 1.

Phase 2, query and generation (`ShardedKVCache`): the query tokens are replicated on every device; each attends
over its local KV shard and returns (output, log-sum-exp), merged exactly across the axis (`merge_over_axis`).
Only the query host (the last device on the axis) stores the KV of query and generated tokens: every shard ends
in `local` slots, used on the query host only (empty, position -1, elsewhere). The cache has the `attend`
method of `layers.common.KVCache`, so the unchanged model runs on it.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from lizard_jax.distributed.common import AXIS, merge_over_axis, shard_map
from lizard_jax.distributed.ring import ring_attention_shard, zigzag_order
from lizard_jax.ops.softmax import attention

Array = jax.Array


def context_attention(q, k, v, q_positions, k_positions, *, mesh: Mesh, axis: str = AXIS, scale=None):
    """Phase 2 as an op: q `[B, T, H, D]` (replicated) attends over k/v `[B, S, KVH, D]` sharded along `axis` on
    dim 1, by positions (`k_positions [B, S]`, -1 = empty). Each device attends locally; (o, lse) merge exactly.
    Returns (o `[B, T, H, D]` float32, lse `[B, H, T]`), equal to global attention over all of k/v."""
    shard, rep = P(None, axis), P()
    body = functools.partial(_attend_shard, axis=axis, scale=scale)
    return shard_map(body, mesh, in_specs=(rep, shard, shard, rep, shard), out_specs=(rep, rep))(
        q, k, v, q_positions, k_positions)


def _attend_shard(q, k, v, q_positions, k_positions, *, axis: str, scale):
    """Inside shard_map: attention over this device's keys (by positions), merged over `axis`."""
    o, lse = attention(q, k, v, q_positions=q_positions, k_positions=k_positions, scale=scale, return_lse=True,
                       impl="xla")
    return merge_over_axis(o, lse, axis)


@flax.struct.dataclass
class ShardedKVCache:
    """A layer's KV cache sharded along mesh `axis` on dim 1: k, v `[B, n * (S + local), KVH, D]`, pos
    `[B, n * (S + local)]` (-1 = empty); every device's shard is S context slots then `local` slots, written on
    the query host (the last device) only. `index`: tokens written to the local slots so far."""

    k: Array
    v: Array
    pos: Array
    index: Array
    mesh: Mesh = flax.struct.field(pytree_node=False)
    local: int = flax.struct.field(pytree_node=False)
    axis: str = flax.struct.field(pytree_node=False, default=AXIS)

    def attend(self, q, k_new, v_new, positions, *, window=None, sinks=None, scale=None, impl="auto"):
        """Append k_new/v_new `[B,T,KVH,D]` on the query host and attend with q `[B,T,H,D]` over the whole
        sharded cache (exact global softmax). Returns (o `[B,T,H,D]` dtype of v, new cache). `impl` is unused:
        the short query runs the XLA op (cuDNN needs default positions)."""
        del impl
        _check_full_attention(window, sinks)
        n = self.mesh.shape[self.axis]

        def body(k, v, pos, index, q, k_new, v_new, positions):
            host = jax.lax.axis_index(self.axis) == n - 1
            at = k.shape[1] - self.local + index
            k = jax.lax.dynamic_update_slice(k, k_new.astype(k.dtype), (0, at, 0, 0))
            v = jax.lax.dynamic_update_slice(v, v_new.astype(v.dtype), (0, at, 0, 0))
            pos = jax.lax.dynamic_update_slice(pos, jnp.where(host, positions, -1).astype(pos.dtype), (0, at))
            o, _ = _attend_shard(q, k, v, positions, pos, axis=self.axis, scale=scale)
            return o, k, v, pos

        shard, rep = P(None, self.axis), P()
        o, k, v, pos = shard_map(
            body, self.mesh, in_specs=(shard, shard, shard, rep, rep, rep, rep, rep),
            out_specs=(rep, shard, shard, shard),
        )(self.k, self.v, self.pos, self.index, q, k_new, v_new, positions)
        return o.astype(self.v.dtype), self.replace(k=k, v=v, pos=pos, index=self.index + k_new.shape[1])


@flax.struct.dataclass
class _Record:
    """Phase-1 stand-in for a layer's cache: its `attend` runs plain causal attention over the rows it is given
    (cuDNN where it applies) and records the layer's q, k, v. Used for Star's anchor rows and for Star without
    an anchor."""

    q: Array | None = None
    k: Array | None = None
    v: Array | None = None

    def attend(self, q, k_new, v_new, positions, *, window=None, sinks=None, scale=None, impl="auto"):
        del positions  # rows are laid out so that causal by index equals causal by position (module docstring)
        _check_full_attention(window, sinks)
        return attention(q, k_new, v_new, scale=scale, impl=impl), self.replace(q=q, k=k_new, v=v_new)


@flax.struct.dataclass
class _AnchoredBlocks:
    """Phase-1 cache stand-in for Star's block rows `[R, block]` at one layer: attends over [anchor, block] with
    the anchor's q/k/v `[R, anchor, ., D]` computed once by the anchor rows, causal by index, and records the
    block's own k/v. Rows marked `first` [R] hold block 0, the anchor's own block: laid out [block 0, padding]
    so it never sees the anchor twice."""

    first: Array
    anchor: tuple[Array, Array, Array]
    k: Array | None = None
    v: Array | None = None

    def attend(self, q, k_new, v_new, positions, *, window=None, sinks=None, scale=None, impl="auto"):
        del positions
        _check_full_attention(window, sinks)
        row = lambda anc, own: jnp.where(self.first[:, None, None, None],
                                         jnp.concatenate([own, jnp.zeros_like(anc)], axis=1),
                                         jnp.concatenate([anc, own], axis=1))
        qa, ka, va = self.anchor
        o = attention(row(qa, q), row(ka, k_new), row(va, v_new), scale=scale, impl=impl)
        b, a = q.shape[1], qa.shape[1]
        o = jnp.where(self.first[:, None, None, None], o[:, :b], o[:, a:])
        return o, self.replace(k=k_new, v=v_new)


@flax.struct.dataclass
class _RingStep:
    """Phase-1 cache stand-in for ring attention: exact causal attention over the context axis (`ring.py`),
    records the local k/v."""

    k: Array | None = None
    v: Array | None = None
    devices: int = flax.struct.field(pytree_node=False, default=1)
    axis: str = flax.struct.field(pytree_node=False, default=AXIS)

    def attend(self, q, k_new, v_new, positions, *, window=None, sinks=None, scale=None, impl="auto"):
        del positions
        _check_full_attention(window, sinks)
        o = ring_attention_shard(q, k_new, v_new, n=self.devices, axis=self.axis, scale=scale, impl=impl)
        return o, self.replace(k=k_new, v=v_new)


def _check_full_attention(window, sinks):
    if window is not None or sinks is not None:
        raise ValueError(f"context parallelism supports full softmax attention only, got {window=} and sinks")


def target_logprobs(logits, targets):
    """log p(targets) `[..., T]` float32 under `logits [..., T, vocab]`."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def _encode_layers(model, params, tokens, positions, cache, anchor=None, targets=None):
    """Run every decoder layer over `tokens`/`positions [R, L]` with the cache stand-in `cache` and return the
    per-layer stand-ins (their recorded k/v), and with `targets [R, L]` also the log-probs `[R, L]` of the targets
    under the rows' own (phase-1) logits. With `anchor = (tokens, positions [B, a], first [R])`, the anchor
    rows run through each layer first and their q/k/v (repeated R / B times) feed `_AnchoredBlocks`.
    Without targets, the last layer's MLP and the anchor's unused outputs are removed by XLA."""
    m = model.bind({"params": params})
    x = m.embed(tokens)
    xa = None if anchor is None else m.embed(anchor[0])
    out = []
    for layer in m.layers:
        if anchor is not None:
            xa, rec = layer(xa, anchor[1], _Record())
            rep = lambda t: jnp.repeat(t, tokens.shape[0] // t.shape[0], axis=0)
            cache = _AnchoredBlocks(first=anchor[2], anchor=(rep(rec.q), rep(rec.k), rep(rec.v)))
        x, c = layer(x, positions, cache)
        out.append(c)
    return out, None if targets is None else target_logprobs(m.head(x), targets)


def encode_context(model, params, ctx_tokens, ctx_positions, *, mode: str, mesh: Mesh, block_size: int,
                   anchor_size: int, local: int = 0, axis: str = AXIS, targets=None):
    """Phase 1: encode a right-padded context and return one `ShardedKVCache` per layer.

    ctx_tokens / ctx_positions `[B, C]`: token ids and global positions (0..n_i-1 then -1 padding per row);
    C must be a multiple of block_size x (devices on `axis`). mode "star": blocks of `block_size` with the first
    `anchor_size` tokens as anchor (0 = no anchor); mode "ring": exact causal attention by ring attention (the
    cache then holds the context in zigzag order; positions say where each token is). Every shard gets `local`
    empty slots at its end for the query host.

    With `targets [B, C]` (token ids), returns (caches, logp `[B, C]` float32): log p(targets[:, t]) under the
    phase-1 logits of context token t (Star: its block's view [anchor, block]; ring: exact causal), sharded like
    the context, in the context's own order."""
    if axis not in mesh.axis_names:
        raise ValueError(f"context parallelism needs a mesh with a {axis!r} axis; got axes {mesh.axis_names}")
    n = mesh.shape[axis]
    b, c = ctx_tokens.shape
    if ctx_positions.shape != ctx_tokens.shape:
        raise ValueError(f"{ctx_positions.shape=} must equal {ctx_tokens.shape=}")
    if targets is not None and targets.shape != ctx_tokens.shape:
        raise ValueError(f"{targets.shape=} must equal {ctx_tokens.shape=}")
    if c % (block_size * n):
        raise ValueError(f"context length {c} is not a multiple of block_size x devices = {block_size} x {n}")
    if not 0 <= anchor_size <= block_size:
        raise ValueError(f"anchor_size={anchor_size} must be in [0, block_size={block_size}]")
    shard, rep = P(None, axis), P()

    def add_local(x):  # [B, S, ...] -> [B, S + local, ...] with empty (zero) slots
        return jnp.pad(x, [(0, 0), (0, local)] + [(0, 0)] * (x.ndim - 2))

    if mode == "star":
        per_dev = c // (block_size * n)  # blocks per device, encoded as one batch of rows
        rows = b * per_dev

        def body(params, anchor_tok, anchor_pos, tok, pos, tgt):
            first = jax.lax.axis_index(axis) * per_dev + jnp.arange(per_dev) == 0  # [per_dev]
            first = jnp.broadcast_to(first, (b, per_dev)).reshape(rows)
            as_rows = lambda x: None if x is None else x.reshape(rows, block_size)
            anchor = (anchor_tok, anchor_pos, first) if anchor_size else None
            encoded, logp = _encode_layers(model, params, as_rows(tok), as_rows(pos), _Record(), anchor, as_rows(tgt))
            merge_rows = lambda x: x.reshape(b, per_dev * block_size, *x.shape[2:])
            kv = [(add_local(merge_rows(e.k)), add_local(merge_rows(e.v))) for e in encoded]
            return kv if tgt is None else (kv, merge_rows(logp))

        fn = shard_map(body, mesh, in_specs=(rep, rep, rep, shard, shard, shard), out_specs=shard)
        out = fn(params, ctx_tokens[:, :anchor_size], ctx_positions[:, :anchor_size], ctx_tokens, ctx_positions,
                 targets)
        pos = _with_local(ctx_positions, n, local)  # the kept KV is the context in its own order
    elif mode == "ring":
        order = zigzag_order(c, n)
        tok, pos = ctx_tokens[:, order], ctx_positions[:, order]

        def body(params, tok, pos, tgt):
            encoded, logp = _encode_layers(model, params, tok, pos, _RingStep(devices=n, axis=axis), targets=tgt)
            kv = [(add_local(e.k), add_local(e.v)) for e in encoded]
            return kv if tgt is None else (kv, logp)

        out = shard_map(body, mesh, in_specs=(rep, shard, shard, shard), out_specs=shard)(
            params, tok, pos, None if targets is None else targets[:, order])
        if targets is not None:  # back to the context's own order
            out = (out[0], out[1][:, np.argsort(order)])
        pos = _with_local(pos, n, local)
    else:
        raise ValueError(f"mode must be 'star' or 'ring', got {mode!r}")
    kv = out if targets is None else out[0]
    caches = tuple(ShardedKVCache(k=k, v=v, pos=pos, index=jnp.zeros((), jnp.int32), mesh=mesh, local=local,
                                  axis=axis) for k, v in kv)
    return caches if targets is None else (caches, out[1])


def _with_local(pos, n: int, local: int):
    """Positions `[B, C]` in shard order -> `[B, n * (C/n + local)]` with `local` empty (-1) slots per shard."""
    b, c = pos.shape
    pos = pos.reshape(b, n, c // n)
    return jnp.pad(pos, ((0, 0), (0, 0), (0, local)), constant_values=-1).reshape(b, -1)

