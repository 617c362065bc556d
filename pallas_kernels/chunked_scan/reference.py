"""Oracles for the kernels.

``gla_chunk_reference``: a small pure-jnp oracle in the kernels' own chunk formulation (float32,
differentiable by autodiff).

It computes the intra-chunk scores with the explicit decay tensor ``exp(b_i - b_j)`` of shape
``[C, C, dk]`` (no feature folding, so it checks the folding), and carries the state between chunks with
``lax.scan``. Memory is O(batch * heads * C^2 * dk) per chunk: for tests and documentation, not for speed.

``recurrence_f64``: the plain recurrence with its hand-written backward in float64 numpy.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

_HI = lax.Precision.HIGHEST


def gla_chunk_reference(q, k, v, log_g, *, initial_state=None, chunk: int = 64):
    """Same contract as ``chunked_scan.gla`` (log_g per dimension or ``[..., 1]`` per head).

    Returns ``(o [batch, seq, heads, dv] float32, S_T [batch, heads, dk, dv] float32)``.
    """
    batch, seq, heads, dk = q.shape
    dv = v.shape[-1]
    n = -(-seq // chunk)
    pad = n * chunk - seq

    def chunks(x):  # [B, T, H, d] -> [N, B, H, C, d] float32, zero-padded (exact)
        x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
        return x.reshape(batch, n, chunk, heads, -1).transpose(1, 0, 3, 2, 4)

    qc, kc, vc, gc = chunks(q), chunks(k), chunks(v), chunks(log_g)
    b = jnp.cumsum(gc, axis=3)
    mask = jnp.tril(jnp.ones((chunk, chunk), bool))[:, :, None]
    h0 = jnp.zeros((batch, heads, dk, dv), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)

    def step(h, xs):
        qi, ki, vi, bi = xs  # [B, H, C, d]
        diff = bi[:, :, :, None, :] - bi[:, :, None, :, :]  # [B, H, C(i), C(j), G]
        decay = jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)
        decay = jnp.broadcast_to(decay, decay.shape[:-1] + (dk,))
        a = jnp.einsum("bhid,bhjd,bhijd->bhij", qi, ki, decay, precision=_HI)
        o = jnp.einsum("bhid,bhde->bhie", qi * jnp.exp(bi), h, precision=_HI)
        o = o + jnp.einsum("bhij,bhje->bhie", a, vi, precision=_HI)
        last = bi[:, :, -1:, :]  # [B, H, 1, G]
        kd = ki * jnp.exp(last - bi)
        h = jnp.exp(jnp.swapaxes(last, -1, -2)) * h + jnp.einsum("bhjd,bhje->bhde", kd, vi, precision=_HI)
        return h, o

    ht, o = lax.scan(step, h0, (qc, kc, vc, b))
    o = o.transpose(1, 0, 3, 2, 4).reshape(batch, n * chunk, heads, dv)[:, :seq]
    return o, ht


def recurrence_f64(q, k, v, log_g, h0, do, dht):
    """The plain token-by-token recurrence and its hand-written backward, in float64 numpy (the oracle
    of the tests and of check.py; it shares nothing with the kernels).

    q, k [B,T,H,K]; v, do [B,T,H,V]; log_g [B,T,H,K or 1]; h0, dht [B,H,K,V].
    Returns (o, S_T, {"q", "k", "v", "log_g", "h0"} gradients of sum(o*do) + sum(S_T*dht)).
    States are kept every ~sqrt(T) tokens and recomputed segment by segment in the backward pass.
    """
    q, k, v, log_g, h0, do, dht = (np.asarray(x, np.float64) for x in (q, k, v, log_g, h0, do, dht))
    seq = q.shape[1]
    a = np.exp(log_g)
    stride = max(1, int(np.sqrt(seq)))

    def step(s, t):
        return a[:, t, :, :, None] * s + k[:, t, :, :, None] * v[:, t, :, None, :]

    o = np.zeros(v.shape)
    checkpoints = {}
    s = h0
    for t in range(seq):
        if t % stride == 0:
            checkpoints[t] = s
        s = step(s, t)
        o[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], s)
    grads = {name: np.zeros_like(x) for name, x in (("q", q), ("k", k), ("v", v), ("log_g", log_g))}
    ds = dht.copy()
    for start in reversed(range(0, seq, stride)):
        states = [checkpoints[start]]  # states[i] = S_{start + i - 1}, the state before token start + i
        for t in range(start, min(start + stride, seq)):
            states.append(step(states[-1], t))
        for t in reversed(range(start, min(start + stride, seq))):
            ds = ds + q[:, t, :, :, None] * do[:, t, :, None, :]  # ds: gradient of S_t
            grads["q"][:, t] = np.einsum("bhv,bhkv->bhk", do[:, t], states[t - start + 1])
            grads["k"][:, t] = np.einsum("bhkv,bhv->bhk", ds, v[:, t])
            grads["v"][:, t] = np.einsum("bhk,bhkv->bhv", k[:, t], ds)
            dgate = (states[t - start] * ds).sum(-1)
            if log_g.shape[-1] == 1:
                dgate = dgate.sum(-1, keepdims=True)
            grads["log_g"][:, t] = a[:, t] * dgate
            ds = a[:, t, :, :, None] * ds
    grads["h0"] = ds
    return o, s, grads
