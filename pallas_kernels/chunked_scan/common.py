"""Shared by both backends: block sizes, the static config, and the per-chunk math (`scan.py` binds them).

The recurrence (per batch and head, t = 0..T-1, state S is [dk, dv], float32)::

    S_0 = initial_state or 0,    S_t = diag(exp(log_g_t)) S_{t-1} + k_t^T v_t,    o_t = q_t S_t

Chunk form (C tokens per chunk, h = state entering the chunk, b = inclusive prefix sums of the log-gates
inside the chunk, B their total, everything per key dimension d)::

    o_i    = (q_i * exp(b_i)) h + sum_{j <= i} A_ij v_j,      A_ij = sum_d q_id k_jd exp(b_id - b_jd)
    h_next = exp(B) * h + sum_j (k_j * exp(B - b_j))^T v_j

Why nothing overflows, and why what underflows does not matter (log_g <= 0 is the contract):
- ``exp(b_i)`` and ``exp(B - b_j)`` are <= 1, so the inter-chunk terms cannot overflow; ``B - b_j`` is
  summed directly (an exclusive suffix sum), not as a difference of two long sums.
- The intra-chunk scores ``A`` are one matrix product of folded features (the Lizard paper's trick)::

      q~_i = q_i * exp(b_i - r),   k~_j = k_j * exp(r - b_j),   A = tril(q~ k~^T)

  with ``r`` the per-dimension midpoint of ``b`` over the chunk, so every exponent lies in ``[-s/2, s/2]``
  where ``s`` is the chunk's largest per-dimension decay span ``max_i b - min_i b``. When
  ``s/2 <= FOLD_LIMIT`` (40: exp(40) ~ 2.4e17, finite in float32 and bfloat16 with room for any sum of
  products) this fast path is exact: each product q~_id k~_jd equals q_id k_jd exp(b_id - b_jd) up to the
  rounding of the two factors, and the masked (j > i) entries, which may be large, are removed by a select,
  never by a multiply. Realistic gates (logsigmoid(x)/16: s ~ 3) always take it.
- A chunk whose span is larger (log-gates below about -1.25 per token on average) takes an exact path
  key by key instead (``lax.cond``, per chunk and per dk tile): ``exp(sum_{j<t<=i} g_t)`` with the sum formed
  afresh from token j, which is <= 1 and accurate to float32 rounding even at -20 per token; what
  underflows there is below exp(-87) of the undecayed diagonal term.
- One decay per head (log_g ``[..., 1]``) needs no folding: the [C, C] matrix ``exp(sum_{j<t<=i} g_t)``
  is formed directly (the fast path).

Segment starts (packed documents, ``Config.resets``; ``scan.gla(segment_ids=...)`` writes log_g = -inf at each
start, in every padded dim). -inf never enters the fold: ``chunk_gates`` finds the rows that are -inf in every
column, replaces them by 0 and counts the starts ``n_i`` in [chunk start, i]. Then every prefix/suffix sum, the
midpoint r, the span test and each exp see finite gates <= 0 (the overflow argument above holds as it is; a
start does not by itself push a chunk off the fast path), and the reset is exact by masks: A_ij kept iff
``n_i == n_j``; (q * exp(b)) h iff ``n_i == 0``; exp(B) h iff the chunk has no start; k_j * exp(B - b_j) iff
``n_j == n_{C-1}``. Every pair a replaced gate sits between is masked, so nothing depends on it. Gradients
use the same masks (dq/dk inter terms, da restricted to one segment, dh carried back only through a chunk
without a start); dlog_g's suffix sum over t >= s is restricted to s's segment (a later segment would add
and remove the same pairs: 0 exactly, rounding noise otherwise) and is 0 at a start (its gate multiplies a
discarded state). Masks are selects, or products of finite values with 0/1. Without resets none of this is
traced: the kernels are those without segments.

Gradients are chunk-local and exact; ``chunk_dqk`` writes dlog_g without the catastrophic cancellation of
the textbook ``suffix_sum(q*dq - k*dk)`` form (see its docstring). No product's result is transposed into
another product (Triton 3.4 to 3.7.0 miscompile that on Hopper, flash-linear-attention issue 640): A^T and
dA^T are their own products.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
FOLD_LIMIT = 40.0
BACKENDS = ("gpu", "tpu")
# v1: per-chunk states through HBM (GPU forward 2 launches, backward 4). v2: state carried on chip (GPU forward
# 1 launch, backward 2; TPU chunk 128 and, where the states fit VMEM, a backward without HBM states).
VARIANTS = ("v1", "v2")
DTYPES = ("float32", "bfloat16", "float16")


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the chunked GLA kernels (one static object; forward and backward tiles separate).

    ``chunk``: the time chunk C (forward and backward). The rest is for the GPU kernels (the TPU kernels
    take whole [dk, dv] states per chunk and read only ``chunk``):
      forward: ``block_k`` x ``block_v`` tiles the state in the sequential state pass; ``block_v_out`` the
        dv axis of the output pass.
      backward: ``block_k_bwd`` x ``block_v_bwd`` tiles the state gradient in the reverse-time pass;
        ``block_v_dv`` the dv axis of the dv pass and ``block_k_dv`` its step over dk (A^T adds up over dk
        tiles), ``block_k_dqk`` the dk axis of the dq/dk/dlog_g pass.
      Triton launch: ``num_warps_states`` (both sequential passes), ``num_warps`` (output pass),
        ``num_warps_bwd`` (dv and dq/dk passes), ``num_stages`` (software pipelining of the sequential loops).
    variant "v2" (``gpu_v2.py``) reads: ``block_v`` and ``num_warps`` (the one-launch forward, whole dk per
    program), ``block_k``/``block_v``/``num_warps_states`` (the backward's states pass, as v1), ``block_v_bwd``
    and ``num_warps_bwd`` (the fused reverse-time pass, whole dk per program).
    """

    chunk: int = 64
    block_k: int = 64
    block_v: int = 64
    block_v_out: int = 64
    block_k_bwd: int = 64
    block_v_bwd: int = 64
    block_v_dv: int = 64
    block_k_dv: int = 64
    block_k_dqk: int = 32
    num_warps_states: int = 4
    num_warps: int = 4
    num_warps_bwd: int = 4
    num_stages: int = 2

    _TILES = ("chunk", "block_k", "block_v", "block_v_out", "block_k_bwd", "block_v_bwd", "block_v_dv",
              "block_k_dv", "block_k_dqk")

    def __post_init__(self):
        for name in self._TILES:
            val = getattr(self, name)
            if not (isinstance(val, int) and _is_pow2(val) and val >= 16):
                raise ValueError(f"BlockSizes.{name}={val!r} must be a power of two >= 16")
        for name in ("num_warps_states", "num_warps", "num_warps_bwd"):
            val = getattr(self, name)
            if not (isinstance(val, int) and _is_pow2(val) and val <= 16):
                raise ValueError(f"BlockSizes.{name}={val!r} must be a power of two <= 16")
        if not (isinstance(self.num_stages, int) and self.num_stages >= 1):
            raise ValueError(f"BlockSizes.num_stages={self.num_stages!r} must be an int >= 1")

    @classmethod
    def get_default(cls, dk: int, dv: int, *, chunk: int | None = None, backend: str = "gpu",
                    variant: str = "v1") -> "BlockSizes":
        """Defaults for padded head dims ``dk``, ``dv`` (tiles never exceed the dims). The warp counts keep
        the output and gradient passes off local memory at dk = dv = 128 (Triton 3.6 resource report).
        chunk: 64, except TPU v2: 128 (one MXU-wide tile per product)."""
        if chunk is None:
            chunk = 128 if (backend, variant) == ("tpu", "v2") else 64
        bk, bv = min(64, dk), min(64, dv)
        wide = 8 if max(dk, dv) >= 128 else 4
        return cls(chunk=chunk, block_k=bk, block_v=bv, block_v_out=bv, block_k_bwd=bk, block_v_bwd=bv,
                   block_v_dv=bv, block_k_dv=bk, block_k_dqk=min(32, dk), num_warps_states=4, num_warps=wide,
                   num_warps_bwd=wide)

    def check_dims(self, dk: int, dv: int) -> None:
        """GPU tiles must divide the padded head dims."""
        dims = {"k": dk, "v": dv}
        for name in self._TILES[1:]:
            dim = dims[name.split("_")[1]]
            if dim % getattr(self, name):
                raise ValueError(f"BlockSizes.{name}={getattr(self, name)} does not divide the padded head dim {dim}")


@dataclasses.dataclass(frozen=True)
class Config:
    """Every static option of one call, hashable; bound with functools.partial around the custom_vjp."""

    block_sizes: BlockSizes
    backend: str
    interpret: bool
    dtype: str  # operand dtype of the matrix products (that of q, k, v)
    variant: str = "v1"  # one of VARIANTS
    # segment resets (packed documents): a token whose log-gates are -inf in every (padded) dim starts a new
    # segment; the kernels split it into a finite gate and a reset mask (see ``chunk_gates``). False: the
    # kernels are exactly those without segments (no compare, no mask)
    resets: bool = False

    @property
    def chunk(self) -> int:
        return self.block_sizes.chunk


# --------------------------------------------------------------------------------------------------------
# Matrix products and scans, as the two lowerings accept them


_RELATIONS = {  # out[s] = sum over t with rel(t, s) of x[t]
    "<=": lambda t, s: t <= s,  # inclusive prefix
    "<": lambda t, s: t < s,  # exclusive prefix
    ">=": lambda t, s: t >= s,  # inclusive suffix
    ">": lambda t, s: t > s,  # exclusive suffix
}


@dataclasses.dataclass(frozen=True)
class MatOps:
    """Products with operands cast to ``dtype`` and float32 accumulation; segment sums along axis 0.

    float32 operands use full precision (3xTF32 on the GPU, HIGHEST on the TPU and in interpret mode):
    a plain TF32 product lands near 3e-4 relative error, over the float32 tolerance.
    """

    dtype: Any
    precision: Any  # for products in ``dtype``
    precise: Any  # for the float32 segment-sum products
    tpu: bool
    resets: bool = False  # Config.resets: chunk_gates looks for -inf rows (segment starts)

    @classmethod
    def for_config(cls, cfg: Config) -> "MatOps":
        dtype = jnp.dtype(cfg.dtype)
        if cfg.backend == "gpu" and not cfg.interpret:
            full = lax.DotAlgorithmPreset.TF32_TF32_F32_X3
        else:
            full = lax.Precision.HIGHEST
        # 16-bit inputs: one TF32 pass suffices for the segment sums (a bf16 gate is exact in TF32; the
        # dlog_g terms need ~5e-4 per term against a 2e-2 tolerance) and saves registers on the GPU
        return cls(dtype=dtype, precision=full if dtype == jnp.float32 else None,
                   precise=full if dtype == jnp.float32 or cfg.backend == "tpu" else None,
                   tpu=cfg.backend == "tpu", resets=cfg.resets)

    def _dot(self, a, b, dims):
        return lax.dot_general(a.astype(self.dtype), b.astype(self.dtype), (dims, ((), ())),
                               precision=self.precision, preferred_element_type=F32)

    def mm(self, a, b):
        """a @ b"""
        return self._dot(a, b, ((1,), (0,)))

    def mm_nt(self, a, b):
        """a @ b^T"""
        return self._dot(a, b, ((1,), (1,)))

    def mm_tn(self, a, b):
        """a^T @ b (Mosaic takes the transposed tile, as jax's TPU flash attention does)."""
        if self.tpu:
            return self.mm(a.T, b)
        return self._dot(a, b, ((0,), (0,)))

    def row_to_col(self, row, tile):
        """[1, n] -> [n, 1]. Triton transposes the vector; Mosaic, which tiles (8, 128), gets it as a row-sum
        of the transposed [C, n] ``tile`` whose column sums ``row`` is."""
        if self.tpu:
            return jnp.sum(tile.T, axis=1, keepdims=True)
        return row.T

    def col_to_row(self, col, tile):
        """[n, 1] -> [1, n], likewise (``col`` is the row-sum of the [n, m] ``tile``)."""
        if self.tpu:
            return jnp.sum(tile.T, axis=0, keepdims=True)
        return col.T

    def seg_sum(self, x, rel: str, within=None):
        """out[s] = sum_{t: t rel s} x[t] over axis 0 of [C, G] float32, each sum formed directly (never as a
        difference of two long sums, which would cancel): a Triton scan for the inclusive prefix on the GPU,
        else a full-precision product with a 0/1 mask, or for G = 1 a masked row-sum of [C, C]. within: None or
        a [C, C] bool mask [s, t] that further restricts the sum (t in the segment of s)."""
        c, g = x.shape
        if rel == "<=" and not self.tpu and g > 1 and within is None:  # Triton's scan asserts on a [C, 1] scan
            return jnp.cumsum(x, axis=0)
        keep = _RELATIONS[rel](_iota((c, c), 1), _iota((c, c), 0))  # keep[s, t]
        if within is not None:
            keep = keep & within
        if g == 1:  # no N = 1 product and no [C, 1] transpose
            xt = jnp.broadcast_to(x, (c, c)).T  # xt[s, t] = x[t]
            return jnp.sum(jnp.where(keep, xt, 0.0), axis=1, keepdims=True)
        return lax.dot_general(jnp.where(keep, 1.0, 0.0).astype(F32), x, (((1,), (0,)), ((), ())),
                               precision=self.precise, preferred_element_type=F32)


class Gates(NamedTuple):
    """Log-gate sums of one chunk, g [C, G] float32. The segment fields are None without ``Config.resets``."""

    g: Any  # [C, G] the log-gates (finite: a segment start's -inf replaced by 0)
    b: Any  # [C, G] inclusive prefix sums: the decay from the chunk start through token i
    bt: Any  # [C, G] exclusive suffix sums B - b_j: the decay from token j to the chunk end
    last: Any  # [1, G] B, the whole chunk's decay
    last_col: Any  # [G, 1] B as a column, to scale the rows of a [dk, dv] state
    # segments (float 0/1 masks: every value they multiply is finite, so a product by 0 is an exact 0)
    first: Any = None  # [C, 1] 1 where token i is in the segment of the state entering the chunk
    tail: Any = None  # [C, 1] 1 where token j is in the segment of the state leaving the chunk
    carry: Any = None  # [1, 1] 1 if no segment starts in the chunk (the entering state reaches its end)
    same: Any = None  # [C, C] bool: tokens i and j in one segment
    keep_g: Any = None  # [C, 1] 0 at segment starts (their gate multiplies a discarded state: zero gradient)


def chunk_gates(g, ops: MatOps) -> Gates:
    """The gate sums of one chunk. With ``ops.resets``, a row of g that is -inf in every column is a segment
    start: its gate becomes 0 (so every sum, fold and exponent stays finite and the fast path's span is that of
    the finite gates) and the reset is carried by masks instead, exactly: with ``n_i`` the number of starts in
    [chunk start, i], tokens i and j share a segment iff ``n_i == n_j``; the entering state reaches token i
    iff ``n_i == 0`` and the chunk end iff ``n_{C-1} == 0``; key j reaches the leaving state iff
    ``n_j == n_{C-1}``. Any pair that a replaced gate sits between is masked, so no value depends on it."""
    if ops.resets:
        c = g.shape[0]
        g_max = g if g.shape[1] == 1 else jnp.max(g, axis=1, keepdims=True)  # -inf iff every column is
        start = jnp.where(g_max == -jnp.inf, 1.0, 0.0)  # [C, 1]
        g = jnp.where(jnp.broadcast_to(start, g.shape) > 0.0, 0.0, g)
        n = ops.seg_sum(start, "<=")  # [C, 1] small integers, exact
        total = jnp.sum(start, axis=0, keepdims=True)  # [1, 1]
        n_ij = jnp.broadcast_to(n, (c, c))  # [i, j] = n_i
        segs = dict(first=jnp.maximum(1.0 - n, 0.0), tail=jnp.maximum(1.0 - (total - n), 0.0),
                    carry=jnp.maximum(1.0 - total, 0.0), same=n_ij == n_ij.T, keep_g=1.0 - start)
    else:
        segs = {}
    last = jnp.sum(g, axis=0, keepdims=True)
    last_col = ops.row_to_col(last, g) if g.shape[1] > 1 else last
    return Gates(g=g, b=ops.seg_sum(g, "<="), bt=ops.seg_sum(g, ">"), last=last, last_col=last_col, **segs)


def _masked(x, m):
    """x * m for a float 0/1 mask m (x finite), or x itself without segments (m None)."""
    return x if m is None else x * m


# --------------------------------------------------------------------------------------------------------
# Per-chunk math on loaded tiles. q, k: [C, dk]; v, do: [C, dv]; b: [C, G] float32 cumulative log-gates
# (G = dk per dimension, G = 1 per head); h, dh: [dk, dv]. Only 2-D arrays (Mosaic layouts), masks by select.


def _iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _causal(c):
    return _iota((c, c), 0) >= _iota((c, c), 1)


def _row(x, j):
    """Row j of x as [1, n] (a masked sum: register tiles have no dynamic row index)."""
    return jnp.sum(jnp.where(_iota(x.shape, 0) == j, x, 0.0), axis=0, keepdims=True)


def _col(x, j):
    """Column j of x as [m, 1]."""
    return jnp.sum(jnp.where(_iota(x.shape, 1) == j, x, 0.0), axis=1, keepdims=True)


def _pair_decay(g, keep, ops: MatOps, transpose=False):
    """Per-head gate g [C, 1]: exp(b_i - b_j) on the kept entries (j <= i), 0 elsewhere; [C, C] or its
    transpose. Each exponent is summed afresh over j < t <= i (no difference of long prefix sums)."""
    c = g.shape[0]
    rows, cols = _iota((c, c), 0), _iota((c, c), 1)
    d = ops.seg_sum(jnp.where(rows > cols, jnp.broadcast_to(g, (c, c)), 0.0), "<=")  # d[i, j] = sum_{j<t<=i} g_t
    if transpose:
        d = d.T
    return jnp.where(keep, jnp.exp(jnp.minimum(d, 0.0)), 0.0)


def _fold_reference(b):
    """Per-dimension midpoint r [1, dk] and whether every |b - r| <= FOLD_LIMIT (the fast path is exact)."""
    hi = jnp.max(b, axis=0, keepdims=True)
    lo = jnp.min(b, axis=0, keepdims=True)
    return 0.5 * (hi + lo), jnp.max(hi - lo) <= 2.0 * FOLD_LIMIT


# No product's result is ever transposed into another product: Triton 3.4 to 3.7.0 miscompiles that on
# Hopper (flash-linear-attention issue 640). Where A^T or dA^T is needed it is computed as its own product.


def _decay_from(g, j, ops: MatOps):
    """exp(b_i - b_j) for rows i >= j (1 at i = j), 0 above: the log-decay summed afresh from token j + 1,
    never as a difference of two long prefix sums (which loses absolute precision when the decay is strong)."""
    rows = _iota(g.shape, 0)
    return jnp.where(rows >= j, jnp.exp(jnp.minimum(ops.seg_sum(jnp.where(rows > j, g, 0.0), "<="), 0.0)), 0.0)


def intra_scores(q, k, g, b, ops: MatOps, transpose: bool = False, same=None):
    """A[i, j] = sum_d q_id k_jd exp(b_id - b_jd) for j <= i, else 0; [C, C] float32 (A^T if transpose).

    g: the chunk's log-gates [C, G], b: their inclusive prefix sums; same: None or the [C, C] segment mask
    (symmetric), which removes the pairs of different segments."""
    c = q.shape[0]
    keep = _iota((c, c), 1) >= _iota((c, c), 0) if transpose else _causal(c)
    if same is not None:
        keep = keep & same
    if b.shape[1] == 1:
        qk = ops.mm_nt(k, q) if transpose else ops.mm_nt(q, k)
        return jnp.where(keep, qk * _pair_decay(g, keep, ops, transpose), 0.0)
    r, fits = _fold_reference(b)
    qf, kf = q.astype(F32), k.astype(F32)

    def folded():
        qs, ks = qf * jnp.exp(b - r), kf * jnp.exp(r - b)
        return jnp.where(keep, ops.mm_nt(ks, qs) if transpose else ops.mm_nt(qs, ks), 0.0)

    def by_key():
        # key j: p[i, d] = q_id k_jd exp(b_id - b_jd) is column j of A summed over d, row j of A^T
        def body(j, a):
            p = qf * _decay_from(g, j, ops) * _row(kf, j)
            if transpose:
                return a + jnp.where(_iota((c, c), 0) == j, jnp.sum(p.T, axis=0, keepdims=True), 0.0)
            return a + jnp.where(_iota((c, c), 1) == j, jnp.sum(p, axis=1, keepdims=True), 0.0)

        a = lax.fori_loop(0, c, body, jnp.zeros((c, c), F32))
        return a if same is None else jnp.where(same, a, 0.0)

    return lax.cond(fits, folded, by_key)


def intra_grads(da, da_t, q, k, g, b, ops: MatOps):
    """Gradients of sum_ij da_ij A_ij: (dq, dk) intra-chunk parts, [C, dk]. da is zero on and above the
    diagonal and da_t is its transpose (computed as its own product)."""
    c = q.shape[0]
    if b.shape[1] == 1:
        keep, keep_t = _causal(c), _iota((c, c), 1) >= _iota((c, c), 0)
        return ops.mm(da * _pair_decay(g, keep, ops), k), ops.mm(da_t * _pair_decay(g, keep_t, ops, True), q)
    r, fits = _fold_reference(b)
    qf, kf = q.astype(F32), k.astype(F32)

    def folded():
        eq, ek = jnp.exp(b - r), jnp.exp(r - b)
        return ops.mm(da, kf * ek) * eq, ops.mm(da_t, qf * eq) * ek

    def by_key():
        rows = _iota(qf.shape, 0)

        def body(j, carry):
            dq, dk = carry
            w = _col(da, j) * _decay_from(g, j, ops)  # [C, dk]: da_ij exp(b_i - b_j)
            dkj = jnp.sum(w * qf, axis=0, keepdims=True)
            return dq + w * _row(kf, j), dk + jnp.where(rows == j, dkj, 0.0)

        zeros = jnp.zeros(qf.shape, F32)
        return lax.fori_loop(0, c, body, (zeros, zeros))

    return lax.cond(fits, folded, by_key)


def chunk_output(q, k, v, gates: Gates, h, ops: MatOps):
    """o = (q * exp(b)) h + A v. [C, dv] float32."""
    qd = _masked(q.astype(F32) * jnp.exp(gates.b), gates.first)
    return ops.mm(qd, h) + ops.mm(intra_scores(q, k, gates.g, gates.b, ops, same=gates.same), v)


def state_update(h, k, v, gates: Gates, ops: MatOps):
    """h_next = exp(B) * h + (k * exp(B - b))^T v, float32 [dk, dv]."""
    kd = _masked(k.astype(F32) * jnp.exp(gates.bt), gates.tail)
    return _masked(jnp.exp(gates.last_col), gates.carry) * h + ops.mm_tn(kd, v)


def dstate_update(dh, q, do, gates: Gates, ops: MatOps):
    """Gradient of the state entering the chunk from that of the state leaving it: exp(B) * dh + (q*exp(b))^T do."""
    qd = _masked(q.astype(F32) * jnp.exp(gates.b), gates.first)
    return _masked(jnp.exp(gates.last_col), gates.carry) * dh + ops.mm_tn(qd, do)


def dv_parts(q, k, gates: Gates, dh, ops: MatOps):
    """The two terms of dv that contract over key dimensions, for a tile of them: (A^T [C, C] from this
    tile's dims, (k * exp(B - b)) dh [C, bv]). Both add up over tiles; dv = A^T do + the second."""
    kd = _masked(k.astype(F32) * jnp.exp(gates.bt), gates.tail)
    return intra_scores(q, k, gates.g, gates.b, ops, transpose=True, same=gates.same), ops.mm(kd, dh)


def chunk_dv(q, k, gates: Gates, do, dh, ops: MatOps):
    """dv = A^T do + (k * exp(B - b)) dh for one chunk and a dv tile of do [C, bv], dh [dk, bv]."""
    a_t, state_part = dv_parts(q, k, gates, dh, ops)
    return ops.mm(a_t, do) + state_part


def chunk_dqk(q, k, gates: Gates, v, do, h, dh, ops: MatOps):
    """dq, dk [C, bk] and dlog_g [C, bk or 1] of one chunk for a tile of key dimensions: q, k [C, bk],
    gates of that tile (per dimension) or of the head; v, do [C, dv] whole; h, dh [bk, dv] the rows of the
    state entering the chunk and of the gradient of the state leaving it. Per head, dlog_g is this tile's
    share (the tiles' shares add up).

    dlog_g without cancellation: with P_ij = da_ij q_i k_j exp(b_i - b_j) (per dimension), the intra-chunk
    part of dL/dg_s is the sum of P_ij over the pairs i >= s > j that the decay g_s sits between. It is
    formed as suffix sums over t >= s of q_t*dq_t - k_t*dk_t with the diagonal (i = j, undecayed and O(1))
    left out of both: the pairs that cancel then each carry at least one gate factor, so a strong decay
    does not leave an O(1) cancellation to resolve an O(exp(g)) result. Likewise the state path gives
    sum_{j < s} k_j*dk_inter_j, an exclusive prefix sum formed directly.
    """
    c = q.shape[0]
    b = gates.b
    rows, cols = _iota((c, c), 0), _iota((c, c), 1)

    def strict(mask):  # pairs of different segments carry nothing (same is symmetric)
        return mask if gates.same is None else mask & gates.same

    da = ops.mm_nt(do, v)
    dq_strict, dk_strict = intra_grads(jnp.where(strict(rows > cols), da, 0.0),
                                       jnp.where(strict(rows < cols), ops.mm_nt(v, do), 0.0), q, k, gates.g, b, ops)
    da_diag = jnp.sum(jnp.where(rows == cols, da, 0.0), axis=1, keepdims=True)  # [C, 1]
    qf, kf = q.astype(F32), k.astype(F32)
    dq_inter = _masked(ops.mm_nt(do, h) * jnp.exp(b), gates.first)
    dk_inter = _masked(ops.mm_nt(v, dh) * jnp.exp(gates.bt), gates.tail)
    x = qf * (dq_inter + dq_strict) - kf * dk_strict
    y = kf * dk_inter
    hdh = h.astype(F32) * dh.astype(F32)
    extra = _masked(jnp.exp(gates.last), gates.carry) * ops.col_to_row(jnp.sum(hdh, axis=1, keepdims=True), hdh)
    if b.shape[1] == 1:
        x, y, extra = (jnp.sum(t, axis=1, keepdims=True) for t in (x, y, extra))
    # the suffix sum stays inside the segment of s: a later segment's x_t adds and removes the same pairs (0 in
    # exact arithmetic, rounding noise otherwise); y is nonzero in the last segment only. A segment start's
    # gate multiplies a discarded state: its gradient is 0 (already 0 in exact arithmetic; the mask removes
    # the rounding)
    dg = _masked(ops.seg_sum(x, ">=", gates.same) + ops.seg_sum(y, "<") + extra, gates.keep_g)
    return dq_inter + dq_strict + da_diag * kf, dk_inter + dk_strict + da_diag * qf, dg
