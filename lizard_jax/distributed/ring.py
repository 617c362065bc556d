"""Ring attention: exact global causal attention over a sequence sharded along a mesh axis.

Layout ("zigzag", causal load balancing): the sequence, right-padded to a multiple of 2n for n devices, is cut
into 2n chunks; device d holds chunks d and 2n-1-d, so every device has the same share of early and late
positions. Each of the n-1 ring steps passes the KV shard to the next device (`ppermute`) while the current one
is used, and merges (output, log-sum-exp) online in float32. With this layout every step is one dense block:
- step 0, own shard: causal by index (positions increase along [chunk d, chunk 2n-1-d]);
- KV from an earlier device j < d: all local queries see only the sender's first chunk j, fully;
- KV from a later device j > d: only the local second chunk sees the sender's two chunks, fully;
so each device does 1 causal + (n-1) half-size unmasked blocks (half the work of masking full blocks).

Padding sits at the end of the sequence, so index masks are exact for every real query (a padded chunk is only
ever seen by later, padded queries). Named in results as "ring attention, zigzag load-balanced, ppermute of KV,
shard = C/n tokens per device".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from lizard_jax.distributed.common import AXIS, attend_lse, merge, shard_map
from lizard_jax.ops.softmax import attention


def zigzag_order(length: int, n: int) -> np.ndarray:
    """Indices that put a sequence of `length` (a multiple of 2n) in zigzag order: device d's shard is
    [chunk d, chunk 2n-1-d]. `x[:, zigzag_order(T, n)]` then shards evenly over n devices."""
    if length % (2 * n):
        raise ValueError(f"zigzag layout needs a length divisible by 2 * devices = {2 * n}, got {length}")
    c = length // (2 * n)
    chunks = np.arange(length).reshape(2 * n, c)
    return np.concatenate([np.concatenate([chunks[d], chunks[2 * n - 1 - d]]) for d in range(n)])


def ring_attention_shard(q, k, v, *, n: int, axis: str = AXIS, scale: float | None = None, impl: str = "auto"):
    """Inside `shard_map` over `axis` (size n): this device's zigzag shard q `[B, 2c, H, D]`, k/v `[B, 2c, KVH, D]`
    -> causal attention output `[B, 2c, H, D]` (dtype of v) over the whole sequence."""
    if n == 1:  # the whole sequence is here: plain causal attention (cuDNN on a GPU where it applies)
        return attention(q, k, v, scale=scale, impl=impl)
    if q.shape[1] % 2:
        raise ValueError(f"a zigzag shard holds two equal chunks, got {q.shape[1]} tokens")
    c = q.shape[1] // 2
    d = jax.lax.axis_index(axis)
    o, lse = attend_lse(q, k, v, causal=True, scale=scale, impl=impl)
    b, h, dv = q.shape[0], q.shape[2], v.shape[-1]

    def from_earlier(kv):  # all local queries x the sender's first chunk
        o_s, lse_s = attend_lse(q, kv[0][:, :c], kv[1][:, :c], causal=False, scale=scale, impl=impl)
        return o_s.astype(jnp.float32), lse_s

    def from_later(kv):  # the local second chunk x both sender chunks; the first chunk sees nothing
        o_s, lse_s = attend_lse(q[:, c:], kv[0], kv[1], causal=False, scale=scale, impl=impl)
        o_s = jnp.concatenate([jnp.zeros((b, c, h, dv), jnp.float32), o_s.astype(jnp.float32)], axis=1)
        lse_s = jnp.concatenate([jnp.full((b, h, c), -jnp.inf, jnp.float32), lse_s], axis=2)
        return o_s, lse_s

    perm = [(i, (i + 1) % n) for i in range(n)]
    nxt = jax.lax.ppermute((k, v), axis, perm)
    for step in range(1, n):
        kv = nxt
        if step < n - 1:  # start the next transfer before this step's compute so the two can overlap
            nxt = jax.lax.ppermute(kv, axis, perm)
        sender = (d - step) % n
        o_s, lse_s = jax.lax.cond(sender < d, from_earlier, from_later, kv)
        o, lse = merge(o, lse, o_s, lse_s)
    return o.astype(v.dtype)


def ring_attention(q, k, v, *, mesh: Mesh, axis: str = AXIS, scale: float | None = None, impl: str = "auto"):
    """Exact causal attention of q `[B, T, H, D]`, k/v `[B, T, KVH, D]` (any T) computed by ring attention over
    mesh `axis`: pads T to a multiple of 2n, lays it out zigzag, runs the ring, restores the order."""
    if axis not in mesh.axis_names:
        raise ValueError(f"ring attention needs a mesh with a {axis!r} axis; got axes {mesh.axis_names}")
    if q.shape[1] != k.shape[1] or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"self-attention needs equal lengths: {q.shape=} {k.shape=} {v.shape=}")
    n = mesh.shape[axis]
    t = q.shape[1]
    width = -(-t // (2 * n)) * (2 * n)
    order = zigzag_order(width, n)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, width - t), (0, 0), (0, 0)))[:, order]
    spec = P(None, axis)
    fn = lambda q, k, v: ring_attention_shard(q, k, v, n=n, axis=axis, scale=scale, impl=impl)
    o = shard_map(fn, mesh, in_specs=(spec, spec, spec), out_specs=spec)(pad(q), pad(k), pad(v))
    return o[:, np.argsort(order)][:, :t]
