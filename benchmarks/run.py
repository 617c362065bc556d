"""The benchmark runner: every timed row of the project in one bounded, resumable command.

    python -m benchmarks.run --budget-s 540 --out results.json [--resume] [--only gla,sparse] [--tiny]
    python -m benchmarks.run --plan [--ceilings-json ceil.json] [--tiny]     # no timing: static costs, roofline
    python -m benchmarks.run report --out results.json [--results-md PATH]   # append the table to RESULTS.md

Steps, in order of importance (``--plan`` prints them with their bounds):
  1. ceilings        bf16 matmul TFLOP/s and copy GB/s (``common.measure_ceilings``): every prediction's scale
  2. gla             chunked GLA, ours, every variant (``VARIANTS``), per-dim and per-head gates, fwd and fwd+bwd
  3. sparse          block-sparse attention, ours, every design (``DESIGNS``), 1/8 and 1/16 selected
  4. fla-tune        fla's Triton autotuning and compiles at every shape (untimed; its own bound, so compile
                     time never eats a timed row's budget; the Triton caches it fills are reused by step 5)
  5. gla-fla         fla ``chunk_gla`` (per-dim) and ``chunk_simple_gla`` (per-head) on the same shapes
  6. sparse-cudnn    dense causal cuDNN (``jax.nn.dot_product_attention(implementation="cudnn")``)
  7. teacher         the teacher forward (``bench_model.bench``), random Llama-3.2-1B shape, bf16
  8. lizard-sala     prefill / decode speed (``lizard_jax.eval.speed``) of a random SmolLM2-shaped teacher and its
                     Lizard and SALA students (attention from configs/lizard_smollm2.yaml, sala_generic.yaml)
  9. lazyllm         LazyLLM TTFT, full vs lazy prefill (``bench_lazyllm.ttft``), random Llama-1B shape
 10. star-prefill    Star block-parallel vs global causal prefill on one device (``bench_star.time_prefill``)
 11. star            Star / ring / global prefill + decode over all devices (``bench_star.bench_one``)
Ours first (what the issue is about), then the baselines they are compared with, then the model-level rows.

Each step runs in its own subprocess with its own time limit (``limit_s``; less if less budget is left); a step
that overruns or fails is recorded (its unfinished rows get status "timeout" / "failed" and the reason) and the
runner goes on. A step is not started when its estimate (``est_s``, scaled by its rows still to do) does not fit
in what is left of ``--budget-s``: it is recorded "budget" and a later, cheaper step may still run. Every row
is written to ``--out`` as soon as it is measured (atomic write); ``--resume`` keeps rows with status "ok" or
"skipped" and runs the rest. Timed kernel rows carry ``predicted_ms``: the roofline time of the kernel's static
cost (``pallas_kernels/<op>/cost.py``; for fla / cuDNN the ideal minimum bytes and FLOPs) against the ceilings
measured in step 1, so the report shows measured vs predicted.

``--tiny``: the same steps at tiny shapes on the CPU, kernels in interpret mode; fla and cuDNN rows are skipped
with a reason (no GPU). Used by tests/test_bench_runner.py.

Segment-id (packed sequence, issue #19) rows: step "segments", after "sparse", times the same kernels on rows
packed with ``SEGMENTS`` documents of ragged lengths (``segments`` field of the row spec; the id ends in
``/seg{n}``), beside the unsegmented rows of the steps before: the overhead of segment ids. Only kernels that take
segment ids have rows: chunked GLA v1/v2 (``SEGMENT_GLA_VARIANTS``), block-sparse v1/v2 (``SEGMENT_DESIGNS``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from benchmarks.common import H200_CEILINGS, RESULTS, atomic_write_json, command_line, format_table, roofline_ms

ROOT = Path(__file__).resolve().parents[1]
FINISHED = ("ok", "skipped")


# ------------------------------------------------------------------------------------------------- shapes


@dataclasses.dataclass(frozen=True)
class Shapes:
    gla: dict
    gla_seqs: tuple[int, ...]
    sparse: dict
    sparse_seqs: tuple[int, ...]
    sparse_fracs: tuple[int, ...]
    model: str  # bench_model / bench_star config name
    model_seq: int
    model_batch: int
    speed_teacher: str
    speed_contexts: tuple[int, ...]
    lazy_lengths: tuple[int, ...]
    prefill_lengths: tuple[int, ...]
    prefill_configs: tuple[tuple[int, int], ...]  # Star (block, anchor); global first
    star_lengths: tuple[int, ...]
    reps: int


PRODUCTION = Shapes(
    gla=dict(batch=8, heads=16, dk=128, dv=128, dtype="bfloat16"), gla_seqs=(2048, 4096, 8192, 16384),
    sparse=dict(batch=1, heads=16, kv_heads=4, head_dim=128, block_size=64, dtype="bfloat16"),
    sparse_seqs=(8192, 32768, 65536), sparse_fracs=(8, 16),
    model="llama1b", model_seq=4096, model_batch=4, speed_teacher="smollm2", speed_contexts=(4096, 16384, 32768),
    lazy_lengths=(8192, 32768), prefill_lengths=(32768, 65536), prefill_configs=((8192, 8192), (8192, 2048)),
    star_lengths=(32768,), reps=20,
)
TINY = Shapes(
    gla=dict(batch=1, heads=2, dk=16, dv=16, dtype="float32"), gla_seqs=(64,),
    sparse=dict(batch=1, heads=2, kv_heads=1, head_dim=16, block_size=16, dtype="float32"),
    sparse_seqs=(128,), sparse_fracs=(8,),
    model="tiny", model_seq=64, model_batch=1, speed_teacher="tiny", speed_contexts=(64,),
    lazy_lengths=(64,), prefill_lengths=(128,), prefill_configs=((64, 32),),
    star_lengths=(64,), reps=2,
)
PASSES = ("fwd", "fwd+bwd")
GATES = ("per-dim", "per-head")


# GLA tile settings timed beside each variant's defaults: name -> (variant, BlockSizes overrides of (dk, dv)).
# v2 with the whole dv in one backward program writes dq/dk once in the operand dtype instead of float32 shares
# per dv tile (cost.py at T=4096, dv=128: 3.0 GB instead of 6.2 GB fwd+bwd), if its registers hold it.
GLA_TILES = {"v2-wholedv": ("v2", lambda dk, dv: dict(block_v_bwd=dv))}


def gla_variants() -> tuple[str, ...]:
    from pallas_kernels.chunked_scan import VARIANTS

    return (*VARIANTS, *GLA_TILES)


def gla_kernel_args(impl: str, dk: int, dv: int) -> dict:
    """gla()'s variant and block_sizes for a row's impl name (a variant, or a GLA_TILES entry)."""
    from pallas_kernels.chunked_scan import BlockSizes

    variant, over = GLA_TILES.get(impl, (impl, lambda dk, dv: {}))
    return dict(variant=variant, block_sizes=dataclasses.replace(
        BlockSizes.get_default(dk, dv, variant=variant), **over(dk, dv)))


def sparse_designs() -> tuple[str, ...]:
    from pallas_kernels.block_sparse import DESIGNS

    return DESIGNS


# --------------------------------------------------------------------------------------------- row specs


# packed rows of the "segments" step: documents per row, and the kernels that take segment ids
SEGMENTS = 8
SEGMENT_DESIGNS = ("v1", "v2")
SEGMENT_GLA_VARIANTS = ("v1", "v2")


def _seg_suffix(segments: int | None) -> str:
    return "" if segments is None else f"/seg{segments}"


def _gla_rows(sh: Shapes, impls, segments: int | None = None) -> list[dict]:
    # a backward tile setting leaves the forward as its variant has it: timed once
    return [dict(id=f"gla/{impl}/{gate}/T{t}/{p}{_seg_suffix(segments)}", impl=impl, gate=gate, T=t, mode=p,
                 **({} if segments is None else {"segments": segments}))
            for t in sh.gla_seqs for gate in GATES for impl in impls for p in PASSES
            if not (impl in GLA_TILES and p == "fwd")]


def _sparse_rows(sh: Shapes, impls, segments: int | None = None) -> list[dict]:
    return [dict(id=f"sparse/{impl}/T{t}/1of{f}/{p}{_seg_suffix(segments)}", impl=impl, T=t, frac=f, mode=p,
                 **({} if segments is None else {"segments": segments}))
            for t in sh.sparse_seqs for f in sh.sparse_fracs for impl in impls for p in PASSES]


def _segment_rows(sh: Shapes) -> list[dict]:
    return _gla_rows(sh, SEGMENT_GLA_VARIANTS, SEGMENTS) + _sparse_rows(sh, SEGMENT_DESIGNS, SEGMENTS)


def segment_ids_of(batch: int, seq: int, n: int):
    """int32 `[batch, seq]`: `n` documents of ragged lengths (deterministic; none a multiple of 64) per row."""
    import numpy as np

    cuts = np.sort(np.random.default_rng(seq).choice(np.arange(1, seq), n - 1, replace=False))
    row = np.zeros(seq, np.int32)
    row[cuts] = 1
    return np.broadcast_to(np.cumsum(row, dtype=np.int32) + 1, (batch, seq)).copy()


def _cudnn_rows(sh: Shapes) -> list[dict]:
    return [dict(id=f"sparse/cudnn/T{t}/{p}", impl="cudnn", T=t, mode=p) for t in sh.sparse_seqs for p in PASSES]


def _prefill_runs(sh: Shapes):
    return [("global", None, 0)] + [(f"star{b}:{a}", b, a) for b, a in sh.prefill_configs]


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    limit_s: float  # the subprocess is killed after this (or after the budget left, if less)
    est_s: float  # plan estimate of the whole step on an H200, for --budget-s
    rows: Callable[[Shapes], list[dict]]
    what: str


STEPS = [
    Step("ceilings", 60, 15, lambda sh: [dict(id="ceilings")], "bf16 matmul and copy ceilings"),
    Step("gla", 300, 190, lambda sh: _gla_rows(sh, gla_variants()), "chunked GLA, ours, every variant"),
    Step("sparse", 180, 100, lambda sh: _sparse_rows(sh, sparse_designs()), "block-sparse, ours, every design"),
    Step("segments", 300, 150, _segment_rows, f"packed rows ({SEGMENTS} documents): chunked GLA v1/v2, "
         "block-sparse v1/v2"),
    Step("fla-tune", 240, 120, lambda sh: [dict(id="fla-tune")], "fla Triton autotune + compile (untimed)"),
    Step("gla-fla", 120, 40, lambda sh: _gla_rows(sh, ("fla",)), "fla chunk_gla / chunk_simple_gla"),
    Step("sparse-cudnn", 90, 30, _cudnn_rows, "dense causal cuDNN"),
    Step("teacher", 120, 45, lambda sh: [dict(id=f"teacher/{sh.model}/T{sh.model_seq}")], "teacher forward"),
    Step("lizard-sala", 300, 150, lambda sh: [dict(id=f"speed/{m}/T{c}", model=m, T=c) for m in
                                               ("teacher", "lizard", "sala") for c in sh.speed_contexts],
         "prefill/decode speed: teacher, Lizard, SALA"),
    Step("lazyllm", 180, 90, lambda sh: [dict(id=f"lazyllm/{k}/T{t}", kind=k, T=t) for t in sh.lazy_lengths
                                         for k in ("full", "lazy")], "LazyLLM TTFT"),
    Step("star-prefill", 240, 120, lambda sh: [dict(id=f"star-prefill/{n}/T{t}", run=n, T=t) for t in
                                               sh.prefill_lengths for n, _, _ in _prefill_runs(sh)],
         "Star vs global prefill, one device"),
    Step("star", 300, 150, lambda sh: [dict(id=f"star/{m}/T{t}", mode=m, T=t) for t in sh.star_lengths
                                       for m in ("global", "star", "ring")], "Star / ring / global, all devices"),
]
STEP_BY_NAME = {s.name: s for s in STEPS}


# ------------------------------------------------------------------------------------------- static costs


def _dt_bytes(dtype: str) -> int:
    return {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]


def gla_ideal(*, batch, seq, heads, dk, dv, per_dim, dtype, mode, chunk=64) -> dict:
    """The minimum of any chunk-form GLA: inputs read once, outputs written once; the chunk algorithm's matmuls
    (C=64: forward 2C(dk+dv) + 4 dk dv per token; backward 6C(dk+dv) + 10 dk dv more)."""
    e = _dt_bytes(dtype)
    tok = batch * seq * heads
    g = tok * (dk if per_dim else 1) * e
    fwd_bytes = tok * (2 * dk + dv) * e + g + tok * dv * e
    flops = tok * (2 * chunk * (dk + dv) + 4 * dk * dv)
    bytes_ = fwd_bytes
    if mode != "fwd":
        bytes_ += tok * dv * e + tok * (2 * dk + dv) * e + g  # do in; dq, dk, dv, dg out
        flops += tok * (6 * chunk * (dk + dv) + 10 * dk * dv)
    return dict(hbm_bytes=float(bytes_), flops=float(flops), launches=None)


def sparse_pairs(seq: int, block_size: int, frac: int | None) -> int:
    """Causal (query, key) pairs per query head: dense, or the runner's selection (K = n_blocks/frac blocks per
    query block incl. the diagonal, clamped by causality)."""
    if frac is None:
        return seq * (seq + 1) // 2
    n = seq // block_size
    k = max(2, n // frac)
    diag = block_size * (block_size + 1) // 2
    return sum((min(i + 1, k) - 1) * block_size**2 + diag for i in range(n))


def attention_ideal(*, batch, seq, heads, kv_heads, head_dim, dtype, mode, pairs) -> dict:
    """q, k, v read and o written once (+ do in, dq dk dv out); 4 d FLOPs per visible pair forward, 3.5x that
    forward+backward."""
    e = _dt_bytes(dtype)
    q = batch * seq * heads * head_dim * e
    kv = batch * seq * kv_heads * head_dim * e
    bytes_ = 2 * q + 2 * kv
    flops = 4 * head_dim * heads * batch * pairs
    if mode != "fwd":
        bytes_ += 2 * q + 2 * kv + q
        flops *= 3.5
    return dict(hbm_bytes=float(bytes_), flops=float(flops), launches=None)


def _kernel_cost(module: str, name: str, mode: str, kw: dict) -> dict:
    """``cost.py`` of a kernel (``cost(name, ..., mode="fwd" | "fwd_bwd")``) as a dict."""
    import importlib

    c = importlib.import_module(module).cost(name, mode="fwd" if mode == "fwd" else "fwd_bwd", **kw)
    return {k: getattr(c, k) for k in ("hbm_bytes", "flops", "launches")}


def row_cost(row: dict, sh: Shapes) -> dict | None:
    """Static cost {hbm_bytes, flops, launches, source} of a kernel row; None for rows without one."""
    rid = row["id"]
    if rid.startswith("gla/"):
        g = sh.gla
        kw = dict(batch=g["batch"], seq=row["T"], heads=g["heads"], dk=g["dk"], dv=g["dv"],
                  per_dim=row["gate"] == "per-dim", dtype=g["dtype"])
        if row["impl"] != "fla":
            args = gla_kernel_args(row["impl"], g["dk"], g["dv"])
            c = _kernel_cost("pallas_kernels.chunked_scan.cost", args["variant"], row["mode"],
                             dict(kw, block_sizes=args["block_sizes"]))
            return {**c, "source": f"cost.py {row['impl']}"}
        return {**gla_ideal(mode=row["mode"], **kw), "source": "ideal minimum"}
    if rid.startswith("sparse/"):
        s = sh.sparse
        frac = None if row["impl"] == "cudnn" else row["frac"]
        kw = dict(batch=s["batch"], seq=row["T"], heads=s["heads"], kv_heads=s["kv_heads"],
                  head_dim=s["head_dim"], dtype=s["dtype"])
        if frac is not None:
            k = max(2, row["T"] // s["block_size"] // frac)
            c = _kernel_cost("pallas_kernels.block_sparse.cost", row["impl"], row["mode"],
                             dict(kw, block_size=s["block_size"], selected_blocks_per_query_block=k))
            if row.get("segments"):  # the ids' extra bytes (cost.segment_bytes)
                from pallas_kernels.block_sparse.cost import segment_bytes

                kw.pop("head_dim"), kw.pop("dtype")
                c["hbm_bytes"] += segment_bytes(**kw, design=row["impl"], block_size=s["block_size"],
                                                selected_blocks_per_query_block=k,
                                                mode="fwd" if row["mode"] == "fwd" else "fwd_bwd")
                return {**c, "source": f"cost.py {row['impl']} + segment_bytes"}
            return {**c, "source": f"cost.py {row['impl']}"}
        pairs = sparse_pairs(row["T"], s["block_size"], frac)
        return {**attention_ideal(mode=row["mode"], pairs=pairs, **kw), "source": "ideal minimum"}
    return None


def predicted(row: dict, sh: Shapes, ceilings: dict) -> dict:
    """{predicted_ms, bound, hbm_bytes, flops, launches, cost_source} for a kernel row ({} otherwise)."""
    try:
        c = row_cost(row, sh)
    except Exception as e:  # a cost module that fails must not stop a measurement
        return {"cost_source": f"cost failed: {type(e).__name__}: {str(e)[:100]}"}
    if c is None:
        return {}
    ms, bound = roofline_ms(c["flops"], c["hbm_bytes"], ceilings)
    return dict(predicted_ms=ms, bound=bound, hbm_bytes=c["hbm_bytes"], flops=c["flops"],
                launches=c["launches"], cost_source=c["source"])


# -------------------------------------------------------------------------------------------------- store


class Store:
    """results JSON: {"meta": {...}, "steps": {name: {...}}, "rows": {id: {...}}}, rewritten atomically."""

    def __init__(self, path):
        self.path = Path(path)

    def load(self) -> dict:
        if self.path.is_file():
            return json.loads(self.path.read_text())
        return {"meta": {}, "steps": {}, "rows": {}}

    def update(self, fn: Callable[[dict], None]) -> None:
        data = self.load()
        fn(data)
        atomic_write_json(self.path, data)

    def put_row(self, row: dict) -> None:
        def f(d):
            d["rows"][row["id"]] = row
        self.update(f)
        print(f"  row {row['id']}: {row.get('status')} "
              + (f"{row['ms']:.4g} ms" if isinstance(row.get("ms"), float) else str(row.get("note", ""))[:100]),
              flush=True)


# ------------------------------------------------------------------------------------- measuring (child)


def _backend() -> str:
    import jax

    return jax.default_backend()


def _time(fn, args, sh: Shapes) -> float:
    from benchmarks.kernels_gla import _time_jax

    return _time_jax(fn, *args, reps=sh.reps, loops=5 if sh is PRODUCTION else 1)


def _ok(spec: dict, ms: float, sh: Shapes, ceilings: dict, **extra) -> dict:
    p = predicted(spec, sh, ceilings)
    row = {**spec, **extra, "status": "ok", "ms": ms, **p}
    if p.get("predicted_ms"):
        row["measured/predicted"] = ms / p["predicted_ms"]
    if p.get("flops"):
        row["TFLOP/s"] = p["flops"] / (ms * 1e-3) / 1e12
    return row


def _skip(spec: dict, why: str) -> dict:
    return {**spec, "status": "skipped", "note": why}


def _fail(spec: dict, e: BaseException) -> dict:
    return {**spec, "status": "failed", "note": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}


def run_ceilings(specs, sh, ctx):
    import jax

    from benchmarks.common import device_name, measure_ceilings

    c = measure_ceilings(n=256, copy_bytes=1 << 22) if ctx.tiny else measure_ceilings()
    dev = device_name()
    ctx.store.update(lambda d: d["meta"].update(device=dev, jax_version=jax.__version__, ceilings=c))
    yield {**specs[0], "status": "ok", "ms": None, **c, "device": dev}


def _gla_inputs(sh: Shapes, seq: int, per_dim: bool):
    import jax
    import jax.numpy as jnp

    g = sh.gla
    ks = jax.random.split(jax.random.key(seq), 5)
    dt = jnp.dtype(g["dtype"])
    shape = (g["batch"], seq, g["heads"], g["dk"])
    q, k, v, do = (jax.random.normal(kk, shape, dt) for kk in ks[:4])
    gshape = shape if per_dim else shape[:3] + (1,)
    lg = (jax.nn.log_sigmoid(jax.random.normal(ks[4], gshape, jnp.float32)) / 16).astype(dt)
    return jax.block_until_ready((q, k, v, lg, do))


def _fwd_fwdbwd(f, n_in: int):
    import jax

    @jax.jit
    def fwd_bwd(*a):
        o, vjp = jax.vjp(f, *a[:n_in])
        return o, vjp(a[n_in])

    return jax.jit(f), fwd_bwd


def run_gla(specs, sh, ctx):
    from pallas_kernels.chunked_scan import gla

    interpret = ctx.tiny
    for spec in specs:
        try:
            q, k, v, lg, do = _gla_inputs(sh, spec["T"], spec["gate"] == "per-dim")
            kw = gla_kernel_args(spec["impl"], sh.gla["dk"], sh.gla["dv"])
            if spec.get("segments"):  # packed rows: the state restarts at each document
                import jax.numpy as jnp

                kw["segment_ids"] = jnp.asarray(segment_ids_of(q.shape[0], spec["T"], spec["segments"]))
            f = lambda q, k, v, g: gla(q, k, v, g, backend="gpu", interpret=interpret, **kw)  # noqa: E731
            fwd, fb = _fwd_fwdbwd(f, 4)
            ms = _time(fwd, (q, k, v, lg), sh) if spec["mode"] == "fwd" else _time(fb, (q, k, v, lg, do), sh)
            yield _ok(spec, ms, sh, ctx.ceilings, note="interpret (CPU)" if interpret else "")
        except Exception as e:
            yield _fail(spec, e)


def _fla(ctx):
    if ctx.tiny or _backend() != "gpu":
        return None, "needs a GPU (fla's Triton kernels); tiny/CPU run"
    try:
        from benchmarks.kernels_gla import _import_fla

        chunk_gla, chunk_simple_gla, chunk_o = _import_fla()
        return (chunk_gla, chunk_simple_gla, chunk_o), ""
    except Exception as e:
        return None, f"fla not importable: {type(e).__name__}: {str(e)[:120]}"


def _fla_call(fns, spec, sh):
    """(torch fn of no arguments) -> (fwd callable, fwd+bwd callable) of fla on the runner's inputs."""
    import torch

    chunk_gla, chunk_simple_gla, chunk_o = fns
    per_dim = spec["gate"] == "per-dim"
    q, k, v, lg, do = _gla_inputs(sh, spec["T"], per_dim)
    fn = chunk_gla if per_dim else chunk_simple_gla
    if not per_dim and not chunk_o.TRITON_ABOVE_3_7_1:
        chunk_o.TRITON_ABOVE_3_7_1 = True  # timed past fla's refusal (fla issue 640), as kernels_gla.py
    tq, tk, tv, tg, tdo = (torch.from_dlpack(x) for x in (q, k, v, lg if per_dim else lg[..., 0], do))
    leaves = [x.detach().clone().requires_grad_() for x in (tq, tk, tv, tg)]

    def step():
        o, _ = fn(*leaves, scale=1.0)
        o.backward(tdo)

    return (lambda: fn(tq, tk, tv, tg, scale=1.0)), step, leaves


def run_fla_tune(specs, sh, ctx):
    fns, why = _fla(ctx)
    if fns is None:
        yield _skip(specs[0], why)
        return
    import torch

    t0 = time.perf_counter()
    for spec in _gla_rows(sh, ("fla",)):
        fwd, step, _ = _fla_call(fns, spec, sh)
        (fwd if spec["mode"] == "fwd" else step)()
        torch.cuda.synchronize()
    yield {**specs[0], "status": "ok", "ms": None, "note": f"tuned and compiled in {time.perf_counter() - t0:.0f} s"}


def run_gla_fla(specs, sh, ctx):
    fns, why = _fla(ctx)
    for spec in specs:
        if fns is None:
            yield _skip(spec, why)
            continue
        try:
            from triton.testing import do_bench

            fwd, step, leaves = _fla_call(fns, spec, sh)
            name = "chunk_gla" if spec["gate"] == "per-dim" else "chunk_simple_gla"
            (fwd if spec["mode"] == "fwd" else step)()  # any autotuning left happens here, untimed
            if spec["mode"] == "fwd":
                ms = do_bench(fwd, warmup=25, rep=100, return_mode="median")
            else:
                ms = do_bench(step, warmup=25, rep=100, grad_to_none=leaves, return_mode="median")
            yield _ok(spec, ms, sh, ctx.ceilings, note=f"fla {name}")
        except Exception as e:
            yield _fail(spec, e)


def _sparse_inputs(sh: Shapes, seq: int):
    import jax
    import jax.numpy as jnp

    s = sh.sparse
    dt = jnp.dtype(s["dtype"])
    ks = jax.random.split(jax.random.key(seq), 4)
    q = jax.random.normal(ks[0], (s["batch"], seq, s["heads"], s["head_dim"]), dt)
    k, v = (jax.random.normal(kk, (s["batch"], seq, s["kv_heads"], s["head_dim"]), dt) for kk in ks[1:3])
    do = jax.random.normal(ks[3], q.shape, dt)
    return jax.block_until_ready((q, k, v, do))


def run_sparse(specs, sh, ctx):
    import functools

    import jax

    from lizard_jax.ops.sparse import infllm_select
    from pallas_kernels.block_sparse import block_sparse_attention

    bs = sh.sparse["block_size"]
    has_designs = len(sparse_designs()) > 1 or "variant" in block_sparse_attention.__code__.co_varnames
    for spec in specs:
        try:
            q, k, v, do = _sparse_inputs(sh, spec["T"])
            total = max(2, spec["T"] // bs // spec["frac"])
            seg = {}
            if spec.get("segments"):  # packed rows: selection and kernel inside each document
                seg = dict(segment_ids=jax.numpy.asarray(segment_ids_of(q.shape[0], spec["T"], spec["segments"])))
            select = jax.jit(functools.partial(infllm_select, block_size=bs, topk=total - total // 2,
                                               local_window=(total // 2) * bs, **seg))
            idx, cnt = jax.block_until_ready(select(q, k))
            kw = dict(dict(variant=spec["impl"]) if has_designs else {}, **seg)
            f = lambda q, k, v: block_sparse_attention(  # noqa: E731
                q, k, v, idx, cnt, block_size=bs, backend="gpu", interpret=ctx.tiny, **kw)
            fwd, fb = _fwd_fwdbwd(f, 3)
            ms = _time(fwd, (q, k, v), sh) if spec["mode"] == "fwd" else _time(fb, (q, k, v, do), sh)
            yield _ok(spec, ms, sh, ctx.ceilings, blocks_per_qblock=total,
                      note="interpret (CPU)" if ctx.tiny else "InfLLM-V2 selection, half top-k, half local")
        except Exception as e:
            yield _fail(spec, e)


def run_cudnn(specs, sh, ctx):
    import functools

    import jax

    gpu = not ctx.tiny and _backend() == "gpu"
    for spec in specs:
        if not gpu:
            yield _skip(spec, "needs a GPU (cuDNN); tiny/CPU run")
            continue
        try:
            q, k, v, do = _sparse_inputs(sh, spec["T"])
            f = functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="cudnn")
            fwd, fb = _fwd_fwdbwd(f, 3)
            ms = _time(fwd, (q, k, v), sh) if spec["mode"] == "fwd" else _time(fb, (q, k, v, do), sh)
            yield _ok(spec, ms, sh, ctx.ceilings, note="jax.nn.dot_product_attention cudnn, causal")
        except Exception as e:
            yield _fail(spec, e)


def _model(name: str):
    """(label, ModelConfig) of bench_star's configs (llama1b, smollm2, tiny), bf16 on a GPU, fp32 on a CPU."""
    from benchmarks.bench_star import model_config

    return model_config(name, "float32" if _backend() == "cpu" else "bfloat16")


def run_teacher(specs, sh, ctx):
    import jax

    from benchmarks.bench_model import bench, forward_flops
    from lizard_jax.models import init_params

    for spec in specs:
        try:
            label, cfg = _model(sh.model)
            params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
            r = bench(label, cfg, params, sh.model_batch, sh.model_seq, ctx.ceilings["matmul_tflops"])
            if not isinstance(r[3], float):
                raise RuntimeError(str(r[3]))
            flops = forward_flops(cfg, sh.model_batch, sh.model_seq)
            ms_pred, _ = roofline_ms(flops, 0.0, ctx.ceilings)
            yield {**spec, "status": "ok", "ms": r[3], "tokens/s": r[4], "TFLOP/s": r[5], "flops": flops,
                   "predicted_ms": ms_pred, "measured/predicted": r[3] / ms_pred, "bound": "compute",
                   "note": f"{label}, batch {sh.model_batch}, matmul+attention FLOPs at the matmul ceiling"}
        except Exception as e:
            yield _fail(spec, e)


def run_speed(specs, sh, ctx):
    import jax
    import yaml

    from lizard_jax.eval.speed import SpeedOptions, speed
    from lizard_jax.models import Transformer, init_params
    from lizard_jax.recipes import student_config
    from lizard_jax.sala import recipe_attention

    label, teacher = _model(sh.speed_teacher)
    recipes = {"lizard": ROOT / "configs" / ("lizard_tiny.yaml" if ctx.tiny else "lizard_smollm2.yaml"),
               "sala": ROOT / "configs" / "sala_generic.yaml"}
    opts = SpeedOptions(decode_tokens=8 if ctx.tiny else 64, reps=2 if ctx.tiny else 5)
    by_model: dict[str, list] = {}
    for spec in specs:
        by_model.setdefault(spec["model"], []).append(spec)
    for name, group in by_model.items():
        try:
            cfg = teacher if name == "teacher" else student_config(
                teacher, recipe_attention(yaml.safe_load(recipes[name].read_text()), str(recipes[name])))
            params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
            out = speed(Transformer(cfg), params, [s["T"] for s in group], opts)
        except Exception as e:
            for spec in group:
                yield _fail(spec, e)
            continue
        for spec, r in zip(group, out["rows"]):
            if r.get("status", "ok") != "ok" or r.get("prefill_ms") is None:
                yield {**spec, "status": "failed", "note": str(r.get("status"))}
            else:
                yield {**spec, "status": "ok", "ms": r["prefill_ms"], "decode tok/s": r.get("decode_tok_s"),
                       "cache_bytes": r.get("cache_bytes"), "note": f"{label} shape; ms = prefill (TTFT)"}
        del params


def run_lazyllm(specs, sh, ctx):
    import jax

    from benchmarks.bench_lazyllm import ttft
    from lizard_jax.lazy import LazyConfig
    from lizard_jax.models import Transformer, init_params

    label, cfg = _model(sh.model)
    model = Transformer(cfg)
    params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
    lazy = LazyConfig.default(cfg.num_layers)
    for spec in specs:
        try:
            ms, frac = ttft(model, params, spec["T"], lazy if spec["kind"] == "lazy" else None, sh.reps // 4 or 1)
            yield {**spec, "status": "ok", "ms": ms, "computed": frac,
                   "note": f"{label}; schedule {lazy.layers}/{lazy.keep}" if spec["kind"] == "lazy" else label}
        except Exception as e:
            yield _fail(spec, e)


def run_star_prefill(specs, sh, ctx):
    import jax

    from benchmarks.bench_star import random_prompt, replicate, sub_mesh, time_prefill
    from benchmarks.bench_star_prefill import attention_pairs
    from lizard_jax.models import Transformer, init_params

    label, cfg = _model(sh.model)
    model = Transformer(cfg)
    mesh = sub_mesh(1)
    params = replicate(jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0)), mesh)
    runs = {n: (b, a) for n, b, a in _prefill_runs(sh)}
    query = 16 if ctx.tiny else 64
    for spec in specs:
        block, anchor = runs[spec["run"]]
        opts = dict(mode="ring") if block is None else dict(
            mode="star", block_size=block, **(dict(anchor_size=anchor) if anchor else dict(anchor="none")))
        try:
            tokens, positions = random_prompt(cfg, spec["T"])
            t, mem = time_prefill(model, params, mesh, opts, tokens, positions, query=query, local=1, reps=3)
            share = attention_pairs(spec["T"] - query, block, anchor) / attention_pairs(spec["T"] - query, None, 0)
            yield {**spec, "status": "ok", "ms": t * 1e3, "attention FLOP share": share, "compiled_bytes": mem,
                   "note": f"{label}, TTFT incl. {query} query tokens"}
        except Exception as e:
            yield _fail(spec, e)
        jax.clear_caches()


def run_star(specs, sh, ctx):
    import jax

    from benchmarks.bench_star import bench_one, replicate, sub_mesh
    from lizard_jax.models import Transformer, init_params

    label, cfg = _model(sh.model)
    model = Transformer(cfg)
    host = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
    for spec in specs:
        n = 1 if spec["mode"] == "global" else jax.device_count()
        try:
            mesh = sub_mesh(n)
            r = bench_one(model, replicate(host, mesh), mesh, dict(mode="star" if spec["mode"] == "star" else "ring"),
                          spec["T"], 8 if ctx.tiny else 32, 16 if ctx.tiny else 64, 3)
            yield {**spec, "status": "ok", "ms": r["ttft"] * 1e3, "devices": n, "decode tok/s": r["tok_s"],
                   "compiled_bytes": r["mem"], "note": f"{label}; ms = TTFT"}
        except Exception as e:
            yield _fail(spec, e)
        jax.clear_caches()


def run_segments(specs, sh, ctx):
    """The packed rows, through run_gla and run_sparse."""
    yield from run_gla([s for s in specs if s["id"].startswith("gla/")], sh, ctx)
    yield from run_sparse([s for s in specs if s["id"].startswith("sparse/")], sh, ctx)


RUNNERS = {"ceilings": run_ceilings, "gla": run_gla, "sparse": run_sparse, "segments": run_segments,
           "fla-tune": run_fla_tune,
           "gla-fla": run_gla_fla, "sparse-cudnn": run_cudnn, "teacher": run_teacher, "lizard-sala": run_speed,
           "lazyllm": run_lazyllm, "star-prefill": run_star_prefill, "star": run_star}


@dataclasses.dataclass
class Ctx:
    store: Store
    tiny: bool
    ceilings: dict


def child(a) -> int:
    """One step in this process: measure the rows named by --rows, writing each as soon as it is measured."""
    sh = TINY if a.tiny else PRODUCTION
    store = Store(a.out)
    ceilings = store.load()["meta"].get("ceilings") or _ceilings_arg(a)
    want = set(a.rows.split(",")) if a.rows else None
    specs = [r for r in STEP_BY_NAME[a.step].rows(sh) if want is None or r["id"] in want]
    ctx = Ctx(store, a.tiny, ceilings)
    for row in RUNNERS[a.step](specs, sh, ctx):
        store.put_row({**row, "step": a.step, "time": _now()})
    return 0


# ------------------------------------------------------------------------------------------- the runner


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ceilings_arg(a) -> dict:
    if getattr(a, "ceilings_json", None):
        c = json.loads(Path(a.ceilings_json).read_text())
        return {"matmul_tflops": float(c["matmul_tflops"]), "copy_gbs": float(c["copy_gbs"])}
    return dict(H200_CEILINGS)


def selected_steps(only: str | None) -> list[Step]:
    if not only:
        return list(STEPS)
    names = only.split(",")
    unknown = [n for n in names if n not in STEP_BY_NAME]
    if unknown:
        raise SystemExit(f"--only: unknown step(s) {unknown}; steps: {[s.name for s in STEPS]}")
    return [s for s in STEPS if s.name in names]


def print_order(steps: list[Step], sh: Shapes) -> None:
    print("order of measurement (most important first):")
    for i, s in enumerate(steps, 1):
        print(f"  {i:2d}. {s.name:13s} limit {s.limit_s:4.0f} s  est {s.est_s:4.0f} s  "
              f"{len(s.rows(sh)):3d} rows  {s.what}")
    print(f"  total: limits {sum(s.limit_s for s in steps):.0f} s, estimates {sum(s.est_s for s in steps):.0f} s",
          flush=True)


def plan(a) -> int:
    sh = TINY if a.tiny else PRODUCTION
    steps = selected_steps(a.only)
    ceilings = _ceilings_arg(a)
    print(f"plan ({'tiny' if a.tiny else 'production'} shapes); ceilings: bf16 matmul {ceilings['matmul_tflops']:.0f} "
          f"TFLOP/s, copy {ceilings['copy_gbs']:.0f} GB/s" + (" (H200 defaults)" if not a.ceilings_json else ""))
    print_order(steps, sh)
    table = []
    for s in steps:
        for r in s.rows(sh):
            p = predicted(r, sh, ceilings)
            if p.get("predicted_ms") is None:
                if "cost_source" in p:
                    table.append([r["id"], "", "", "", "", "", p["cost_source"]])
                continue
            table.append([r["id"], p["hbm_bytes"] / 1e6, p["flops"] / 1e9,
                          "" if p["launches"] is None else p["launches"], p["predicted_ms"], p["bound"],
                          p["cost_source"]])
    print()
    print(format_table(["row", "HBM MB", "GFLOP", "launches", "roofline ms", "bound", "cost"], table), flush=True)
    return 0


def _remaining(step: Step, sh: Shapes, data: dict, resume: bool) -> list[dict]:
    rows = step.rows(sh)
    if not resume:
        return rows
    return [r for r in rows if data["rows"].get(r["id"], {}).get("status") not in FINISHED]


def run(a, argv) -> int:
    sh = TINY if a.tiny else PRODUCTION
    steps = selected_steps(a.only)
    store = Store(a.out)
    if not a.resume and store.path.exists():
        store.path.unlink()
    cmd = command_line(["-m", "benchmarks.run", *argv])
    store.update(lambda d: (d["meta"].setdefault("commands", []).append(cmd),
                            d["meta"].update(tiny=a.tiny, budget_s=a.budget_s)))
    print_order(steps, sh)
    t_start = time.monotonic()
    # torch (fla) shares the GPU with JAX; fla-tune's compiled kernels reach gla-fla through Triton's on-disk
    # cache, and its autotuning choices too where Triton caches them (TRITON_CACHE_AUTOTUNING, Triton >= 3.4)
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", TRITON_CACHE_AUTOTUNING="1")
    if a.tiny:
        env["JAX_PLATFORMS"] = "cpu"
    for step in steps:
        todo = _remaining(step, sh, store.load(), a.resume)
        if not todo:
            print(f"[{step.name}] all rows finished, skipped (--resume)", flush=True)
            continue
        left = a.budget_s - (time.monotonic() - t_start)
        est = step.est_s * len(todo) / max(1, len(step.rows(sh)))
        if a.tiny:
            est = min(est, 20.0)
        if est > left:
            print(f"[{step.name}] not started: estimate {est:.0f} s > {left:.0f} s of budget left", flush=True)
            store.update(lambda d: d["steps"].__setitem__(step.name, dict(status="budget", est_s=est, left_s=left)))
            continue
        limit = min(step.limit_s, left)
        print(f"[{step.name}] {len(todo)} rows, limit {limit:.0f} s", flush=True)
        cmd_step = [sys.executable, "-m", "benchmarks.run", "_step", step.name, "--out", str(store.path),
                    "--rows", ",".join(r["id"] for r in todo)] + (["--tiny"] if a.tiny else []) + \
            (["--ceilings-json", a.ceilings_json] if a.ceilings_json else [])
        t0, started = time.monotonic(), _now()
        status, tail = "ok", ""
        try:
            p = subprocess.run(cmd_step, cwd=ROOT, env=env, timeout=limit, stdout=None, stderr=subprocess.PIPE,
                               text=True)
            if p.returncode != 0:
                status, tail = "failed", (p.stderr or "").strip().splitlines()[-1:] or [f"exit {p.returncode}"]
                tail = tail[0][:300]
                sys.stderr.write((p.stderr or "")[-3000:])
        except subprocess.TimeoutExpired:
            status, tail = "timeout", f"step killed after {limit:.0f} s"
        wall = time.monotonic() - t0

        def finish(d, step=step, todo=todo, status=status, tail=tail, wall=wall):
            d["steps"][step.name] = dict(status=status, wall_s=wall, limit_s=limit, note=tail)
            for r in todo:  # rows the step never wrote
                if r["id"] not in d["rows"] or (d["rows"][r["id"]].get("time") or "") < started:
                    d["rows"][r["id"]] = {**r, "step": step.name, "status": "timeout" if status == "timeout"
                                          else "failed", "note": tail or "row not reached", "time": _now()}
        store.update(finish)
        print(f"[{step.name}] {status} in {wall:.0f} s", flush=True)
    if not a.no_report:
        report(a)
    return 0


def _cell(v):
    return "" if v is None else v


def report(a) -> str:
    from benchmarks.common import report as append

    data = Store(a.out).load()
    meta = data["meta"]
    rows = list(data["rows"].values())
    order = {s.name: i for i, s in enumerate(STEPS)}
    rows.sort(key=lambda r: order.get(r.get("step"), 99))
    headers = ["row", "status", "ms", "predicted ms", "measured/predicted", "TFLOP/s", "note"]
    table = [[r["id"], r.get("status"), _cell(r.get("ms")), _cell(r.get("predicted_ms")),
              _cell(r.get("measured/predicted")), _cell(r.get("TFLOP/s")),
              str(r.get("note", "") or r.get("cost_source", "")).replace("|", "/")[:120]] for r in rows]
    c = meta.get("ceilings") or {}
    steps = "; ".join(f"{k} {v.get('status')} ({v.get('wall_s', 0):.0f} s)" for k, v in data["steps"].items())
    notes = ((f"measured ceilings: bf16 matmul {c['matmul_tflops']:.0f} TFLOP/s, copy {c['copy_gbs']:.0f} GB/s; "
              if c else "no ceilings measured: predictions against the H200 defaults; ")
             + "predicted = roofline of cost.py (ours) or of the ideal minimum bytes/FLOPs (fla, cuDNN); "
             + f"steps: {steps}; results JSON: {a.out}")
    title = "Benchmark runner (benchmarks/run.py)" + (" --tiny (CPU, interpret)" if meta.get("tiny") else "")
    return append(title, headers, table, notes, path=a.results_md or RESULTS,
                  device=meta.get("device", "not measured"), jax_version=meta.get("jax_version", "?"),
                  command=" ; ".join(meta.get("commands", [])) or None)


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", default="run", choices=["run", "report", "_step"])
    ap.add_argument("step", nargs="?", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="results.json")
    ap.add_argument("--budget-s", type=float, default=540.0)
    ap.add_argument("--resume", action="store_true", help="keep finished rows (ok / skipped) of --out")
    ap.add_argument("--plan", action="store_true", help="print static costs and roofline times; time nothing")
    ap.add_argument("--only", default=None, help="comma-separated step names")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU, kernels in interpret mode")
    ap.add_argument("--ceilings-json", default=None, help="JSON with matmul_tflops and copy_gbs (plan defaults)")
    ap.add_argument("--results-md", default=None, help=f"report to this file (default {RESULTS})")
    ap.add_argument("--no-report", action="store_true", help="do not append the table at the end of a run")
    ap.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    if a.command == "_step":
        return child(a)
    if a.command == "report":
        report(a)
        return 0
    if a.plan:
        return plan(a)
    return run(a, argv)


if __name__ == "__main__":
    sys.exit(main())
