"""GPU benchmark: the chunked GLA Pallas kernels vs flash-linear-attention (fla-core 0.6.0), side by side.

One process, the same random inputs (JAX arrays shared with torch through DLPack): B8 H16 dk=dv=128,
bf16, T in 2K/4K/8K/16K, log_g = logsigmoid(randn)/16 as in fla's tests. Rows: ours with a per-dimension
gate vs ``fla.ops.gla.chunk_gla``; ours with one gate per head (the fast path) vs
``fla.ops.simple_gla.chunk_simple_gla``; forward and forward+backward (outputs and all input gradients).

Timing: fla with ``triton.testing.do_bench`` (median, CUDA events). Ours: JAX dispatches asynchronously, so
``reps`` calls are queued back to back and synchronised once; the median over 5 such loops, per call.

fla refuses chunk_simple_gla's backward on Hopper with Triton in [3.4, 3.7.1) (fla issue 640: wrong
gradients); that row is timed with ``fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True`` and labelled
"timed past the refusal", with its gradient's relative difference from ours in the notes.

fla-core is pure Python: if ``import fla`` fails, the wheel in ``<repo>/.whl/`` is unpacked to a temporary
folder (run with ``carry=[".whl"]`` on the device machine).
Run: ``python -m benchmarks.kernels_gla [--quick | --sweep]``.
"""

from __future__ import annotations

import os

# torch shares the GPU with JAX in this process: JAX must not take 75% of the memory up front
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import glob
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks.common import device_name, format_table, measure_ceilings
from pallas_kernels.chunked_scan import BlockSizes, gla

BATCH, HEADS, DIM = 8, 16, 128
SEQS = (2048, 4096, 8192, 16384)
CHUNK = 64
# fla on this H100, from the user: ms at T=4096
ANCHORS = {("per-dim", "fwd"): 1.59, ("per-dim", "fwd+bwd"): 7.41, ("per-head", "fwd"): 0.50,
           ("per-head", "fwd+bwd"): 3.02}
# tile variants tried at T=4096 with --sweep (each spill-free in bf16 under Triton 3.6's resource report);
# the default is BlockSizes.get_default(128, 128). (name, overrides, gates it applies to)
VARIANTS = [
    ("out-v128", dict(block_v_out=128), ("per-dim", "per-head")),
    ("dv-v128", dict(block_v_dv=128), ("per-dim", "per-head")),
    ("seq-32x32", dict(block_k=32, block_v=32, block_k_bwd=32, block_v_bwd=32), ("per-dim", "per-head")),
    ("seq-k128", dict(block_k=128, block_k_bwd=128), ("per-dim", "per-head")),
    ("stages3", dict(num_stages=3), ("per-dim", "per-head")),
    ("warps4", dict(num_warps=4, num_warps_bwd=4), ("per-head",)),  # per-dim spills at 4 warps
]


def _import_fla():
    try:
        import fla  # noqa: F401
    except ImportError:
        wheels = sorted(glob.glob(str(Path(__file__).resolve().parents[1] / ".whl" / "fla_core-*.whl")))
        if not wheels:
            raise
        target = tempfile.mkdtemp(prefix="fla_core_")
        with zipfile.ZipFile(wheels[-1]) as zf:
            zf.extractall(target)
        sys.path.insert(0, target)
    import fla.ops.common.chunk_o as chunk_o
    from fla.ops.gla import chunk_gla
    from fla.ops.simple_gla import chunk_simple_gla

    return chunk_gla, chunk_simple_gla, chunk_o


def model_flops(seq: int, backward: bool) -> float:
    """Matrix-product FLOPs of the chunk algorithm (C=64): per token, forward 2C(dk+dv) + 4 dk dv (scores,
    A v, q h, k^T v); the backward adds 6C(dk+dv) + 10 dk dv (recomputed states, state gradients, A^T,
    dA and dA^T, the inter and intra parts of dq, dk, dv)."""
    tokens = BATCH * seq * HEADS
    per = 2 * CHUNK * 2 * DIM + 4 * DIM * DIM
    if backward:
        per += 6 * CHUNK * 2 * DIM + 10 * DIM * DIM
    return float(tokens * per)


def min_bytes(seq: int, per_head: bool, backward: bool) -> float:
    """Each input read once, each output written once (bf16): q, k, v, g -> o; + do -> dq, dk, dv, dg."""
    elem = BATCH * seq * HEADS * DIM * 2
    g = BATCH * seq * HEADS * 2 if per_head else elem
    fwd = 3 * elem + g + elem
    return float(fwd + (elem + 3 * elem + g if backward else 0))


def _time_jax(fn, *args, reps: int = 20, loops: int = 5) -> float:
    jax.block_until_ready(fn(*args))  # compile
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(loops):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) * 1e3 / reps)
    return statistics.median(times)


def _inputs(seq: int, seed: int):
    ks = jax.random.split(jax.random.key(seed), 6)
    shape = (BATCH, seq, HEADS, DIM)
    q, k, v, do = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in ks[:4])
    g_dim = (jax.nn.log_sigmoid(jax.random.normal(ks[4], shape, jnp.float32)) / 16).astype(jnp.bfloat16)
    g_head = (jax.nn.log_sigmoid(jax.random.normal(ks[5], shape[:3] + (1,), jnp.float32)) / 16).astype(jnp.bfloat16)
    return jax.block_until_ready((q, k, v, do, g_dim, g_head))


def _ours(q, k, v, g, do, block_sizes=None):
    """(fwd ms, fwd+bwd ms, o, grads)."""
    def f(q, k, v, g):
        return gla(q, k, v, g, backend="gpu", block_sizes=block_sizes)

    fwd = jax.jit(f)

    @jax.jit
    def fwd_bwd(q, k, v, g, do):
        o, vjp = jax.vjp(f, q, k, v, g)
        return o, vjp(do)  # o is returned so the forward output pass is not dropped

    o, grads = jax.block_until_ready(fwd_bwd(q, k, v, g, do))
    return _time_jax(fwd, q, k, v, g), _time_jax(fwd_bwd, q, k, v, g, do), o, grads


def _fla(fn, q, k, v, g, do, past_refusal=None):
    """(fwd ms, fwd+bwd ms, o, grads) of an fla chunk function on the same data (torch via DLPack)."""
    import torch
    from triton.testing import do_bench

    tq, tk, tv, tg, tdo = (torch.from_dlpack(x) for x in (q, k, v, g, do))
    fwd_ms = do_bench(lambda: fn(tq, tk, tv, tg, scale=1.0), warmup=25, rep=100, return_mode="median")
    leaves = [x.detach().clone().requires_grad_() for x in (tq, tk, tv, tg)]

    def step():
        o, _ = fn(*leaves, scale=1.0)
        o.backward(tdo)
        return o

    if past_refusal is not None:
        past_refusal.TRITON_ABOVE_3_7_1 = True
    o = step()
    bwd_ms = do_bench(step, warmup=25, rep=100, grad_to_none=leaves, return_mode="median")
    for x in leaves:
        x.grad = None
    o = step()
    torch.cuda.synchronize()
    grads = [jax.dlpack.from_dlpack(x.grad) for x in leaves]
    return fwd_ms, bwd_ms, jax.dlpack.from_dlpack(o.detach()), grads


@jax.jit
def _rel(a, b):
    """max|a - b| / max|b| on the device (b reshaped to a)."""
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32).reshape(a.shape)
    return jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30)


def _row(impl, gate, seq, kind, ms, ref_ms=None, note=""):
    backward = kind == "fwd+bwd"
    per_head = gate == "per-head"
    return {
        "impl": impl, "gate": gate, "T": seq, "pass": kind, "ms": ms,
        "fla/ours": (ref_ms / ms) if (ref_ms and ms) else None,
        "TFLOP/s": model_flops(seq, backward) / (ms * 1e-3) / 1e12 if ms else None,
        "GB/s (min bytes)": min_bytes(seq, per_head, backward) / (ms * 1e-3) / 1e9 if ms else None,
        "note": note,
    }


def run(quick: bool = False, sweep: bool = False) -> list[dict]:
    """Rows of {impl, gate, T, pass, ms, fla/ours (throughput ratio), TFLOP/s, GB/s, note}.

    quick: T=4096 only. sweep: T=4096 only, plus the tile variants of ours."""
    chunk_gla, chunk_simple_gla, chunk_o = _import_fla()
    import triton

    rows = []
    for seq in ((4096,) if quick or sweep else SEQS):
        q, k, v, do, g_dim, g_head = _inputs(seq, seed=seq)
        for gate, g, fla_fn, fla_name in (("per-dim", g_dim, chunk_gla, "fla chunk_gla"),
                                           ("per-head", g_head, chunk_simple_gla, "fla chunk_simple_gla")):
            first = len(rows)
            refused = gate == "per-head" and not chunk_o.TRITON_ABOVE_3_7_1
            fla_g = g[..., 0] if gate == "per-head" else g
            try:
                f_fwd, f_bwd, f_o, f_grads = _fla(fla_fn, q, k, v, fla_g, do, chunk_o if refused else None)
            except Exception as e:  # keep our rows when fla fails
                f_fwd = f_bwd = None
                f_o = None
                fla_err = f"{type(e).__name__}: {str(e)[:120]}"
            try:
                o_fwd, o_bwd, o, grads = _ours(q, k, v, g, do)
                ours_err = ""
            except Exception as e:
                o_fwd = o_bwd = None
                ours_err = f"{type(e).__name__}: {str(e)[:200]}"
            cmp_note = ""
            if f_o is not None and not ours_err:
                diffs = [float(_rel(a, b)) for a, b in zip((f_o, *f_grads), (o, *grads))]
                cmp_note = "rel. diff. from ours: " + ", ".join(
                    f"{n} {d:.1e}" for n, d in zip(("o", "dq", "dk", "dv", "dg"), diffs))
            label = fla_name + (f" (timed past the refusal, triton {triton.__version__})" if refused else "")
            anchor = f"anchor {ANCHORS[(gate, 'fwd')]} / {ANCHORS[(gate, 'fwd+bwd')]} ms" if seq == 4096 else ""
            if f_o is None:
                rows.append(_row(label, gate, seq, "fwd", None, note=fla_err))
            else:
                rows.append(_row(label, gate, seq, "fwd", f_fwd, note=anchor))
                rows.append(_row(label, gate, seq, "fwd+bwd", f_bwd, note=cmp_note))
            rows.append(_row("ours", gate, seq, "fwd", o_fwd, f_fwd, note=ours_err))
            rows.append(_row("ours", gate, seq, "fwd+bwd", o_bwd, f_bwd))
            if sweep and not ours_err:
                for name, kw, gates in VARIANTS:
                    if gate not in gates:
                        continue
                    bs = BlockSizes(**{**vars(BlockSizes.get_default(DIM, DIM)), **kw})
                    try:
                        vf, vb, _, _ = _ours(q, k, v, g, do, bs)
                        rows.append(_row(f"ours {name}", gate, seq, "fwd", vf, f_fwd))
                        rows.append(_row(f"ours {name}", gate, seq, "fwd+bwd", vb, f_bwd))
                    except Exception as e:
                        rows.append(_row(f"ours {name}", gate, seq, "fwd", None,
                                         note=f"{type(e).__name__}: {str(e)[:120]}"))
            print(format_table(list(rows[first].keys()), [list(r.values()) for r in rows[first:]]), flush=True)
        del q, k, v, do, g_dim, g_head
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="T=4096 only")
    parser.add_argument("--sweep", action="store_true", help="T=4096 only, with ours' tile variants")
    args = parser.parse_args()
    print(f"device {device_name()}; jax {jax.__version__}", flush=True)
    ceilings = measure_ceilings()
    print(f"measured ceilings: bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s, "
          f"copy {ceilings['copy_gbs']:.0f} GB/s (read + write)", flush=True)
    rows = run(quick=args.quick, sweep=args.sweep)
    print()
    print(format_table(list(rows[0].keys()), [list(r.values()) for r in rows]))


if __name__ == "__main__":
    main()
