"""Shared benchmark plumbing: timing, measured ceilings, and the RESULTS.md table.

Every GPU benchmark prints one table and appends it to ``benchmarks/RESULTS.md`` with the date, the
device and the exact command that produced it.
"""

from __future__ import annotations

import datetime
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
# the shipped evaluation text (data/README.md): perplexity and passkey filler by default
WIKITEXT = Path(__file__).resolve().parents[1] / "data" / "wikitext-2" / "valid.txt.xz"


def time_jax(fn: Callable, *args, warmup: int = 3, reps: int = 20) -> float:
    """Median wall time in milliseconds of ``fn(*args)`` (a jitted function), synchronised."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '?')} x{jax.device_count()}"


def measure_ceilings(n: int = 8192, copy_bytes: int = 2 << 30) -> dict[str, float]:
    """bf16 matmul TFLOP/s and device copy GB/s (read + write) measured through XLA."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    t = time_jax(mm, a, b, reps=10)
    tflops = 2 * n**3 / (t * 1e-3) / 1e12
    x = jax.random.normal(ka, (copy_bytes // 4,), jnp.float32)
    cp = jax.jit(lambda x: x * 1.0001)  # a fused elementwise pass: one read, one write
    t = time_jax(cp, x, reps=10)
    gbs = 2 * copy_bytes / (t * 1e-3) / 1e9
    return {"matmul_tflops": tflops, "copy_gbs": gbs}


def format_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def report(title: str, headers: Sequence[str], rows: Sequence[Sequence], notes: str = "") -> str:
    """Print the table and append it, with date, device and command, to RESULTS.md."""
    table = format_table(headers, rows)
    cmd = " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *sys.argv])
    block = (
        f"\n## {title}\n\n"
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n"
        f"- device: {device_name()}; jax {jax.__version__}\n"
        f"- command: `{cmd}`\n"
        + (f"- notes: {notes}\n" if notes else "")
        + f"\n{table}\n"
    )
    print(block, flush=True)
    with RESULTS.open("a") as f:
        f.write(block)
    return block
