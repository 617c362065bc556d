"""Pieces shared by Star and ring attention: shard_map across jax versions, exact (output, log-sum-exp) merges,
and block attention with log-sum-exp on index-based masks.

Partial attention results are pairs (o `[batch, seq, heads, head_dim]`, lse `[batch, heads, seq]` float32) over
disjoint key sets; merging them is exact: `lse = logsumexp_h lse_h`, `o = sum_h exp(lse_h - lse) o_h`. A query
that sees no key in a part has lse = -inf and weight 0 there.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from lizard_jax.ops.softmax import attention

AXIS = "context"

try:  # jax >= 0.7 exports shard_map at the top level (check_vma); older versions only in experimental (check_rep)
    from jax import shard_map as _shard_map

    _CHECK = {"check_vma": False}
except ImportError:  # pragma: no cover - depends on the jax version
    from jax.experimental.shard_map import shard_map as _shard_map

    _CHECK = {"check_rep": False}


def shard_map(f, mesh: Mesh, in_specs, out_specs):
    """`jax.shard_map` (or `jax.experimental.shard_map.shard_map` on older jax) without replication checks
    (ring steps branch on the device index, which the checker cannot follow)."""
    return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **_CHECK)


def _weights(lse, total):
    """exp(lse - total) as `[B, T, H, 1]`, 0 where total is -inf (a query that sees nothing anywhere)."""
    safe = jnp.where(jnp.isfinite(total), total, 0.0)
    return jnp.swapaxes(jnp.exp(lse - safe), 1, 2)[..., None]


def merge(o1, lse1, o2, lse2):
    """Merge two partial results over disjoint keys -> (o float32, lse)."""
    lse = jnp.logaddexp(lse1, lse2)
    o = o1.astype(jnp.float32) * _weights(lse1, lse) + o2.astype(jnp.float32) * _weights(lse2, lse)
    return o, lse


def merge_over_axis(o, lse, axis: str):
    """Inside shard_map: merge every device's partial result along mesh `axis` (all devices get the result).

    Traffic per query token: one output vector and one scalar per head per device (psum), plus one scalar per
    head for the max (pmax)."""
    m = jax.lax.pmax(lse, axis)
    safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse - safe)  # [B, H, T]
    num, den = jax.lax.psum((o.astype(jnp.float32) * jnp.swapaxes(w, 1, 2)[..., None], w), axis)  # one all-reduce
    o = num / jnp.swapaxes(jnp.where(den > 0, den, 1.0), 1, 2)[..., None]
    lse = jnp.where(den > 0, safe + jnp.log(jnp.where(den > 0, den, 1.0)), -jnp.inf)
    return o, lse


def _cudnn_ok(q, k, v) -> bool:
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.dtype == k.dtype == v.dtype)


def _cudnn_lse(q, k, v, *, causal: bool, scale: float):
    """cuDNN flash attention with its float32 softmax statistics. `jax.nn.dot_product_attention` rounds the
    log-sum-exp to the input dtype (too coarse to merge bf16 partials), so this calls the cuDNN wrapper under
    it (a private jax module)."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    o, stats = dot_product_attention(q, k, v, scale=scale, mask_type=MaskType.CAUSAL if causal else MaskType.NO_MASK,
                                     qkv_layout="BTNH", return_residual=True)
    return o, stats.astype(jnp.float32)  # stats [B, H, T]


def attend_lse(q, k, v, *, causal: bool, scale: float | None = None, impl: str = "auto"):
    """Attention with masks by index: causal (`T == S`, query i sees keys j <= i) or none (every key).

    Returns (o `[B,T,H,D]` dtype of v, lse `[B,H,T]` float32). With `impl` "auto"/"cudnn", 16-bit inputs on a GPU
    use cuDNN (with a warning and the XLA path if this jax lacks the private wrapper); else the XLA op."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if impl in ("auto", "cudnn") and _cudnn_ok(q, k, v):
        try:
            return _cudnn_lse(q, k, v, causal=causal, scale=scale)
        except (ImportError, AttributeError, TypeError) as e:  # the private API moved
            warnings.warn(f"cuDNN attention with lse unavailable ({e!r}); using the XLA path", stacklevel=2)
    return attention(q, k, v, causal=causal, scale=scale, return_lse=True, impl="xla")
