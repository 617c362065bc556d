"""Prefill and decode speed, cache bytes and device memory vs context length, for one or several models.

Per context length `C` (random token prompts `[batch, C]`: speed does not depend on the tokens):
- prefill: one jitted program that builds empty caches for `C + decode_tokens` tokens, runs the prompt through
  the model with them and picks the first token (greedy) -- the time to first token. Logits are computed for the
  last position only (`forward_at`), so a 128K prompt never materializes `[C, vocab]` logits.
- decode: one jitted `lax.while_loop` (`lizard_jax.decode.decode_loop`, greedy, no EOS) of `decode_tokens`
  single-token cache steps after that prefill, so the timing is not bound by kernel launches from Python. The
  loop does not donate its input caches (every rep starts from the same prefilled state), so each timed call
  also copies the caches once; that copy is included.
- times: median of `reps` calls after `warmup` calls, synchronised (`time_ms`); programs are compiled ahead of
  time, so compilation is never timed.
- cache_bytes: summed nbytes of the per-layer caches holding `C` tokens (computed from shapes, no allocation):
  grows with `C` for softmax layers, flat for linear-attention layers.
- program_bytes: XLA's memory analysis (arguments + outputs + temporaries - aliased) of the larger of the two
  programs; deterministic, independent of what ran before, available on every backend.
- peak_bytes: the device allocator's `peak_bytes_in_use` (GPU/TPU; None on CPU). It is a high-water mark of the
  whole process: with `isolate=True` every (model, context) runs in a fresh subprocess so it is that context's
  own peak; otherwise contexts run in ascending order and it is the running maximum.
A context that runs out of memory is reported with status "oom" (and its cache bytes), not raised.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lizard_jax.cli import InputError
from lizard_jax.checkpoint import read_config, restore_params
from lizard_jax.config import ModelConfig
from lizard_jax.decode import SamplingConfig, decode_loop
from lizard_jax.models import Transformer, abstract_params, init_caches, init_params


@dataclasses.dataclass(frozen=True)
class SpeedOptions:
    """batch: prompts per call; decode_tokens: cache steps timed after the prefill; warmup/reps: untimed and
    timed calls per measurement (median of reps); seed: of the random prompts."""

    batch: int = 1
    decode_tokens: int = 64
    warmup: int = 1
    reps: int = 5
    seed: int = 0

    def __post_init__(self):
        for name in ("batch", "decode_tokens", "reps"):
            if getattr(self, name) < 1:
                raise InputError(f"SpeedOptions.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise InputError(f"SpeedOptions.warmup must be >= 0, got {self.warmup}")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A model to measure: a lizard_jax checkpoint folder (kind "checkpoint") or a ModelConfig JSON file with
    random parameters (kind "random"; speed does not depend on the weights)."""

    label: str
    kind: str
    path: str

    def __post_init__(self):
        if self.kind not in ("checkpoint", "random"):
            raise InputError(f"ModelSource.kind must be 'checkpoint' or 'random', got {self.kind!r}")
        if not Path(self.path).exists():
            raise FileNotFoundError(f"{self.kind} source not found: {self.path}")

    @classmethod
    def parse(cls, kind: str, value: str) -> "ModelSource":
        """'[LABEL=]PATH' -> a source; the label defaults to the folder / file name."""
        label, sep, path = value.partition("=")
        if not sep:
            label, path = "", value
        if not path:
            raise InputError(f"empty path in {value!r}; expected [LABEL=]PATH")
        return cls(label or Path(path).stem or Path(path).name, kind, path)


# ----------------------------------------------------------------------------------------------------------
# Shared helpers


def time_ms(fn: Callable, *args, warmup: int = 1, reps: int = 5, return_output: bool = False):
    """Median wall time in milliseconds of `fn(*args)` (a jitted/compiled function) over `reps` synchronised
    calls after `warmup` untimed ones; with `return_output`, (ms, the last call's output)."""
    out = None
    for _ in range(warmup):
        out = None  # free the previous output before the next call allocates its own
        out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        out = None
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    return (ms, out) if return_output else ms


def forward_at(model: Transformer, params, tokens, positions=None, caches=None, *, at):
    """Run the decoder over tokens `[batch, seq]` (with per-layer `caches` if given) and return float32 logits
    `[batch, K, vocab]` at the sequence indices `at [batch, K]` only (and the updated caches when given), so
    long prompts never materialize `[batch, seq, vocab]` logits."""
    if at.ndim != 2 or at.shape[0] != tokens.shape[0]:
        raise ValueError(f"at must be [batch, K] with batch {tokens.shape[0]}, got {at.shape=}")

    def run(m, tokens, positions, caches, at):
        x = m.embed(tokens)
        new = []
        for i, layer in enumerate(m.layers):
            x, c = layer(x, positions, None if caches is None else caches[i])
            new.append(c)
        logits = m.head(jnp.take_along_axis(x, at[..., None], axis=1))
        return logits if caches is None else (logits, tuple(new))

    return model.apply({"params": params}, tokens, positions, caches, at, method=run)


def tree_bytes(tree) -> int:
    """Summed nbytes of the leaves of a pytree of arrays or shape structs."""
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def cache_bytes(cfg, batch: int, context: int) -> int:
    """Bytes of the per-layer caches that hold `context` tokens (from shapes; nothing is allocated)."""
    return tree_bytes(jax.eval_shape(lambda: init_caches(cfg, batch, context)))


def program_bytes(compiled) -> int | None:
    """Arguments + outputs + temporaries (- aliased) of a compiled program, per XLA's memory analysis."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # not every backend/version reports it
        return None


def peak_bytes() -> int | None:
    """The first device's allocator high-water mark for this process (None where not reported, e.g. CPU)."""
    stats = jax.devices()[0].memory_stats()
    return None if not stats or "peak_bytes_in_use" not in stats else int(stats["peak_bytes_in_use"])


def is_oom(e: BaseException) -> bool:
    s = str(e)
    return "RESOURCE_EXHAUSTED" in s or "out of memory" in s.lower()


# ----------------------------------------------------------------------------------------------------------
# One model, in this process


def _prefill(model: Transformer, params, tokens, *, cache_len: int):
    """-> (first token [B], last logits [B, V], caches holding the prompt). The unpadded prompt goes in with
    positions=None, as `generate` does, so softmax layers use the fast (cuDNN on a GPU) self-attention path."""
    b, t = tokens.shape
    caches = init_caches(model.cfg, b, cache_len)
    logits, caches = forward_at(model, params, tokens, None, caches, at=jnp.full((b, 1), t - 1, jnp.int32))
    last = logits[:, 0]
    return jnp.argmax(last, axis=-1).astype(jnp.int32), last, caches


def _decode(model: Transformer, params, caches, last_logits, *, steps: int, last_pos: int):
    """`steps` greedy single-token steps from a prefilled cache -> tokens [B, steps]."""
    step = lambda tok, pos, c: model.apply({"params": params}, tok, pos, c)
    b = last_logits.shape[0]
    return decode_loop(step, caches, last_logits, jnp.full((b,), last_pos, jnp.int32), jax.random.key(0),
                       max_new_tokens=steps, sampling=SamplingConfig(), eos_ids=())


def measure(model: Transformer, params, context: int, opts: SpeedOptions = SpeedOptions()) -> dict:
    """Speed and memory of one context length (see the module doc); raises on out-of-memory."""
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    b, n = opts.batch, opts.decode_tokens
    tokens = jax.random.randint(jax.random.key(opts.seed), (b, context), 0, model.cfg.vocab_size, jnp.int32)
    prefill = jax.jit(functools.partial(_prefill, model, cache_len=context + n)).lower(params, tokens).compile()
    t_prefill, (_, last, caches) = time_ms(prefill, params, tokens, warmup=opts.warmup, reps=opts.reps,
                                           return_output=True)
    decode = jax.jit(functools.partial(_decode, model, steps=n, last_pos=context - 1))
    decode = decode.lower(params, caches, last).compile()
    t_decode = time_ms(decode, params, caches, last, warmup=opts.warmup, reps=opts.reps)
    progs = [x for x in (program_bytes(prefill), program_bytes(decode)) if x is not None]
    return {
        "context": context, "status": "ok", "batch": b,
        "prefill_ms": t_prefill, "prefill_tok_s": b * context / (t_prefill * 1e-3),
        "decode_tokens": n, "decode_ms": t_decode, "decode_ms_per_token": t_decode / n,
        "decode_tok_s": b * n / (t_decode * 1e-3),
        "cache_bytes": cache_bytes(model.cfg, b, context),
        "program_bytes": max(progs) if progs else None,
        "peak_bytes": peak_bytes(),
    }


def measure_or_oom(model: Transformer, params, context: int, opts: SpeedOptions = SpeedOptions()) -> dict:
    """`measure`, with an out-of-memory failure returned as a row of status "oom" instead of raised."""
    try:
        return measure(model, params, context, opts)
    except Exception as e:
        if not is_oom(e):
            raise
        return {"context": context, "status": "oom", "batch": opts.batch,
                "cache_bytes": cache_bytes(model.cfg, opts.batch, context), "error": str(e).splitlines()[0][:300]}


def speed(model: Transformer, params, contexts: Sequence[int], opts: SpeedOptions = SpeedOptions(), *,
          label: str = "model", progress: bool = True) -> dict:
    """Measure a (model, params) pair -- e.g. a random config in a benchmark -- at each context (ascending).
    Returns {"label", "dtype", "param_bytes", "rows": [one dict per context]}."""
    contexts = check_contexts(contexts)
    rows = []
    for c in contexts:
        rows.append(measure_or_oom(model, params, c, opts))
        if progress:
            print(f"[speed] {label}: {format_row(rows[-1])}", file=sys.stderr, flush=True)
    return {"label": label, "dtype": model.cfg.dtype, "param_bytes": tree_bytes(params), "rows": rows}


def check_contexts(contexts: Sequence[int]) -> list[int]:
    contexts = [int(c) for c in contexts]
    if not contexts:
        raise InputError("no context lengths given")
    if any(c < 1 for c in contexts) or len(set(contexts)) != len(contexts):
        raise InputError(f"context lengths must be distinct positive integers, got {contexts}")
    return sorted(contexts)


def format_row(r: dict) -> str:
    gib = lambda x: "n/a" if x is None else f"{x / 2**30:.3f} GiB"
    if r["status"] != "ok":
        return f"context {r['context']}: {r['status'].upper()} (cache {gib(r.get('cache_bytes'))}) {r.get('error', '')}"
    return (f"context {r['context']}: prefill {r['prefill_ms']:.1f} ms ({r['prefill_tok_s']:.0f} tok/s), "
            f"decode {r['decode_tok_s']:.1f} tok/s, cache {gib(r['cache_bytes'])}, "
            f"program {gib(r['program_bytes'])}, peak {gib(r['peak_bytes'])}")


# ----------------------------------------------------------------------------------------------------------
# Several models from checkpoints / configs, optionally one subprocess per (model, context)


def source_config(src: ModelSource, dtype: str | None = None):
    """The ModelConfig of a source; `dtype` sets both the compute and the parameter dtype (as served)."""
    cfg = read_config(src.path) if src.kind == "checkpoint" else ModelConfig.from_json(src.path)
    return cfg if dtype is None else cfg.replace(dtype=dtype, param_dtype=dtype)


def load_source(src: ModelSource, dtype: str | None = None):
    """-> (model, params): restored from the checkpoint (cast to `dtype` if given) or random."""
    cfg = source_config(src, dtype)
    if src.kind == "checkpoint":
        params = restore_params(Path(src.path) / "params", cfg, dtype=dtype)
    else:
        params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
    return Transformer(cfg), params


def _measure_in_subprocess(src: ModelSource, dtype: str | None, context: int, opts: SpeedOptions) -> dict:
    spec = {"source": dataclasses.asdict(src), "dtype": dtype, "context": context,
            "options": dataclasses.asdict(opts)}
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([sys.executable, "-m", "lizard_jax.eval.speed", json.dumps(spec)], capture_output=True,
                       text=True, env=env)
    lines = p.stdout.strip().splitlines()
    if p.returncode == 0 and lines:
        return json.loads(lines[-1])  # the row, with the worker's "device"
    err = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
    # a worker killed by the kernel's OOM killer (SIGKILL) ran out of host memory
    status = "oom" if is_oom(p.stderr) or p.returncode == -9 else "failed"
    return {"context": context, "status": status, "batch": opts.batch, "error": err[:300]}


def speed_sources(sources: Sequence[ModelSource], contexts: Sequence[int], opts: SpeedOptions = SpeedOptions(),
                  *, dtype: str | None = None, isolate: bool = False, progress: bool = True) -> dict:
    """Measure several models side by side -> {"task": "speed", ..., "models": {label: speed(...) dict}}.
    `isolate`: one fresh subprocess per (model, context), so `peak_bytes` is that context's own."""
    labels = [s.label for s in sources]
    if not sources:
        raise InputError("no models given")
    if len(set(labels)) != len(labels):
        raise InputError(f"model labels must be distinct, got {labels}; name them with LABEL=PATH")
    contexts = check_contexts(contexts)
    models, devices = {}, set()
    for src in sources:
        if isolate:  # this process never touches a device: the workers get all of its memory
            cfg = source_config(src, dtype)
            rows = []
            for c in contexts:
                r = _measure_in_subprocess(src, dtype, c, opts)
                devices.add(r.pop("device", None))
                r.setdefault("cache_bytes", cache_bytes(cfg, opts.batch, c))  # shapes only: no device needed
                rows.append(r)
                if progress:
                    print(f"[speed] {src.label}: {format_row(r)}", file=sys.stderr, flush=True)
            out = {"label": src.label, "dtype": cfg.dtype, "param_bytes": tree_bytes(nn.unbox(abstract_params(cfg))),
                   "rows": rows}
        else:
            model, params = load_source(src, dtype)
            out = speed(model, params, contexts, opts, label=src.label, progress=progress)
            del model, params
        out.update(kind=src.kind, path=src.path)
        models[src.label] = out
    devices.discard(None)
    device = (" / ".join(sorted(devices)) or "unknown: every worker failed") if isolate else device_name()
    return {"task": "speed", "device": device, "jax": jax.__version__, "isolate": isolate,
            "options": dataclasses.asdict(opts), "contexts": contexts, "models": models}


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '?')} x{jax.device_count()}"


# ----------------------------------------------------------------------------------------------------------
# Plot


def plot_speed(models: dict[str, dict], path: str | Path, title: str | None = None) -> Path:
    """PNG of prefill ms, decode tokens/s and memory vs context, one line per model (`speed_sources`'s
    "models"). Memory: solid = peak_bytes where every row has it, else program_bytes; dashed = cache bytes.
    Contexts that ran out of memory (or failed) are marked with an x at the bottom of the prefill panel."""
    from lizard_jax.figures import pyplot, save_figure

    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    mem_names = set()
    for i, (label, m) in enumerate(models.items()):
        color = f"C{i % 10}"
        ok = [r for r in m["rows"] if r["status"] == "ok"]
        bad = [r["context"] for r in m["rows"] if r["status"] != "ok"]
        x = [r["context"] for r in ok]
        axes[0].plot(x, [r["prefill_ms"] for r in ok], "o-", color=color, label=label)
        if bad:
            axes[0].plot(bad, [0] * len(bad), "x", color=color, ms=10, transform=axes[0].get_xaxis_transform(),
                         clip_on=False, label=f"{label}: out of memory / failed")
        axes[1].plot(x, [r["decode_tok_s"] for r in ok], "o-", color=color, label=label)
        mem = "peak_bytes" if ok and all(r.get("peak_bytes") is not None for r in ok) else "program_bytes"
        mem_names.add(mem)
        axes[2].plot(x, [(r[mem] or 0) / 2**30 for r in ok], "o-", color=color, label=f"{label} ({mem})")
        xc = [r["context"] for r in m["rows"] if r.get("cache_bytes") is not None]
        axes[2].plot(xc, [r["cache_bytes"] / 2**30 for r in m["rows"] if r.get("cache_bytes") is not None],
                     "--", color=color, label=f"{label} (cache)")
    ylabels = ["prefill / time to first token (ms)", "decode (tokens/s)", "memory (GiB)"]
    titles = ["prefill", "decode", "memory: " + " / ".join(sorted(mem_names)) + " (solid), cache (dashed)"]
    for ax, yl, t in zip(axes, ylabels, titles):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(yl)
        ax.set_title(t, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path, title=title, title_size=10)


def _worker(spec_json: str) -> None:
    """One (model, context) measurement in this fresh process; prints its row as one JSON line."""
    spec = json.loads(spec_json)
    src = ModelSource(**spec["source"])
    model, params = load_source(src, spec["dtype"])
    row = measure_or_oom(model, params, spec["context"], SpeedOptions(**spec["options"]))
    print(json.dumps({**row, "device": device_name()}), flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1])
