"""Shared benchmark plumbing: timing, measured ceilings, and the RESULTS.md table.

Every GPU benchmark prints one table and appends it to ``benchmarks/RESULTS.md`` with the date, the
device and the exact command that produced it.
"""

from __future__ import annotations

import datetime
import json
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


def command_line(argv: Sequence[str] | None = None) -> str:
    """The exact command of this process (or of ``argv``), shell-quoted."""
    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *(sys.argv if argv is None else argv)])


def report(title: str, headers: Sequence[str], rows: Sequence[Sequence], notes: str = "", *,
           path: str | Path | None = None, device: str | None = None, jax_version: str | None = None,
           command: str | None = None) -> str:
    """Print the table and append it, with date, device and command, to ``path`` (default RESULTS.md).

    device / jax_version / command default to this process's; a runner that measured in subprocesses passes
    the ones recorded there (so reporting never has to open the device)."""
    table = format_table(headers, rows)
    block = (
        f"\n## {title}\n\n"
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n"
        f"- device: {device or device_name()}; jax {jax_version or jax.__version__}\n"
        f"- command: `{command or command_line()}`\n"
        + (f"- notes: {notes}\n" if notes else "")
        + f"\n{table}\n"
    )
    print(block, flush=True)
    with Path(path or RESULTS).open("a") as f:
        f.write(block)
    return block


# ---------------------------------------------------------------------------------------------- roofline

# bf16 dense matmul and copy (read + write) rates measured with `measure_ceilings` on this workplace's H200s;
# `python -m benchmarks.run --plan` predicts against these unless given --ceilings-json.
H200_CEILINGS = {"matmul_tflops": 790.0, "copy_gbs": 4300.0}


def roofline_ms(flops: float, hbm_bytes: float, ceilings: dict[str, float]) -> tuple[float, str]:
    """(ms, "compute" | "memory"): the larger of FLOPs at the matmul ceiling and bytes at the copy ceiling."""
    t_c = flops / (ceilings["matmul_tflops"] * 1e12) * 1e3
    t_m = hbm_bytes / (ceilings["copy_gbs"] * 1e9) * 1e3
    return (t_c, "compute") if t_c >= t_m else (t_m, "memory")


def atomic_write_json(path: str | Path, obj) -> None:
    """Write JSON so that a reader (or a kill mid-write) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)
