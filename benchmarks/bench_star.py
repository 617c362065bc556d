"""Star Attention vs ring attention vs one-device global attention: long-context prefill + generation.

    python benchmarks/bench_star.py [--models llama1b,smollm2] [--lengths 32768,65536,131072,262144]
        [--devices 2,4] [--modes star,ring,global] [--gen 32] [--passkey-ckpt DIR]
    python benchmarks/bench_star.py --tiny --cpu-devices 8      # end-to-end smoke run on simulated CPUs

Per (model, context length, mode, devices): time to first token (prefill of context + query, first token
sampled), decode tokens/s over `--gen` greedy tokens (EOS off), XLA's compiled memory per device (arguments +
outputs + temporaries of the prefill and decode programs, the larger of the two), and the bytes each device
contributes to the phase-2 merge per generated token (analytic: per layer one fp32 output vector + 2 fp32 scalars
per head, all-reduced; 0 for one device). Modes, all through `lizard_jax.distributed`:
- star: Star Attention, block = context / devices (the paper's default), anchor = first block;
- ring: ring attention, zigzag load-balanced, shard = context / devices (two chunks of C/2n per device),
  ppermute of KV overlapped with the step's block attention (cuDNN with fp32 lse on a GPU), exact;
- global: the same code on a one-device mesh: global causal attention (cuDNN), KV kept for decoding.
Models are random (speed does not depend on weights): a Llama-3.2-1B-shaped config and SmolLM2-135M's shape.
A config that fails (out of memory) is reported as such and the run goes on. `--passkey-ckpt` (a converted
SmolLM2 checkpoint) adds passkey accuracy at 8K (5-digit key, 5 depths, real text) for global and Star on each
device count, through the same code path.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"  # the shipped text (data/README.md)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama1b,smollm2")
    ap.add_argument("--lengths", default="32768,65536,131072,262144")
    ap.add_argument("--devices", default=None, help="context-axis sizes to run (default: all devices)")
    ap.add_argument("--modes", default="star,ring,global")
    ap.add_argument("--gen", type=int, default=32, help="generated tokens")
    ap.add_argument("--query", type=int, default=64, help="query tokens (the prompt's tail)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--passkey-ckpt", default=None, help="converted SmolLM2 checkpoint: add passkey accuracy")
    ap.add_argument("--passkey-length", type=int, default=8192)
    ap.add_argument("--tiny", action="store_true", help="tiny random model and short contexts (smoke test)")
    ap.add_argument("--cpu-devices", type=int, default=None, help="simulate this many CPU devices (sets XLA_FLAGS)")
    ap.add_argument("--no-report", action="store_true", help="print only, do not append to RESULTS.md")
    a = ap.parse_args(argv)
    if a.tiny and a.lengths == ap.get_default("lengths"):
        a.lengths = "256,512"
    if a.tiny and a.models == ap.get_default("models"):
        a.models = "tiny"
    return a


ARGS = parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.cpu_devices:  # must happen before jax is imported
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ARGS.cpu_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(ROOT))

from benchmarks.bench_model import LLAMA_1B  # noqa: E402
from benchmarks.common import report  # noqa: E402
from lizard_jax.config import ModelConfig  # noqa: E402
from lizard_jax.distributed import (  # noqa: E402
    _prefill, generate_context_parallel, prefill_context_parallel, validate_context_parallel,
)
from lizard_jax.generate import SamplingConfig, decode_loop, left_pad  # noqa: E402
from lizard_jax.models import Transformer, init_params  # noqa: E402
from lizard_jax.sharding import make_mesh  # noqa: E402
from lizard_jax.textio import read_text  # noqa: E402

SMOLLM2 = dict(vocab_size=49152, d_model=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
               ffn_dim=1536, tie_embeddings=True, rope={"theta": 100000.0})
TINY = dict(vocab_size=256, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, ffn_dim=128)
CONFIGS = {"llama1b": ("random Llama-1B", LLAMA_1B), "smollm2": ("random SmolLM2-135M", SMOLLM2),
           "tiny": ("random tiny", TINY)}
RING_NAME = "ring attention, zigzag load-balanced, shard C/n (2 chunks of C/2n), ppermute of KV"


def model_config(name: str, dtype: str) -> tuple[str, ModelConfig]:
    label, shape = CONFIGS[name]
    return label, ModelConfig.from_dict({**shape, "dtype": dtype, "param_dtype": dtype})


def sub_mesh(n: int):
    return make_mesh({"context": n}, devices=jax.devices()[:n])


def replicate(tree, mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def compiled_bytes(compiled) -> int | None:
    """Arguments + outputs + temporaries of a compiled program, per device (XLA's memory analysis)."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


def timed(fn, reps: int) -> float:
    """Median seconds of `fn()` (synchronised); the first call (compilation) is not timed."""
    jax.block_until_ready(fn())
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def random_prompt(cfg: ModelConfig, length: int):
    """Random token ids and positions `[1, length]`."""
    tokens = jax.random.randint(jax.random.key(length), (1, length), 1, cfg.vocab_size, jnp.int32)
    return tokens, jnp.arange(length, dtype=jnp.int32)[None]


def time_prefill(model, params, mesh, opts: dict, tokens, positions, *, query: int, local: int, reps: int):
    """(TTFT seconds, compiled bytes per device) of context-parallel prefill + the first (greedy) token."""
    kw = dict(mesh=mesh, query_size=query, local=local, **opts)
    t = timed(lambda: jnp.argmax(prefill_context_parallel(model, params, tokens, positions, **kw)[1], -1), reps)
    o = validate_context_parallel(mesh, model.cfg, query_size=query, **opts)
    compiled = _prefill.lower(model, params, tokens, positions, opts=o, mesh=mesh, local=local).compile()
    return t, compiled_bytes(compiled)


def bench_one(model, params, mesh, opts: dict, length: int, gen: int, query: int, reps: int) -> dict:
    """TTFT (s), decode tok/s and compiled memory per device (the larger program) of one configuration."""
    tokens, positions = random_prompt(model.cfg, length)
    t_first, mem_prefill = time_prefill(model, params, mesh, opts, tokens, positions, query=query, local=gen,
                                        reps=reps)
    caches, last_logits = prefill_context_parallel(model, params, tokens, positions, mesh=mesh, query_size=query,
                                                   local=gen, **opts)

    @jax.jit
    def decode(params, caches, last_logits, key):
        step = lambda tok, pos, c: model.apply({"params": params}, tok, pos, c)
        return decode_loop(step, caches, last_logits, jnp.full((1,), length - 1, jnp.int32), key,
                           max_new_tokens=gen, sampling=SamplingConfig(), eos_ids=())

    key = jax.random.key(0)
    t_dec = timed(lambda: decode(params, caches, last_logits, key), reps)
    mem = [mem_prefill, compiled_bytes(decode.lower(params, caches, last_logits, key).compile())]
    mem = max((m for m in mem if m is not None), default=None)
    return {"ttft": t_first, "tok_s": gen / t_dec, "mem": mem}


def merge_bytes(cfg: ModelConfig, n: int) -> int:
    """Bytes a device contributes to the phase-2 merge per generated token: per layer and head one fp32 output
    vector (psum) and two fp32 scalars (pmax, psum of the denominator)."""
    return 0 if n == 1 else cfg.num_layers * cfg.num_heads * (cfg.head_dim + 2) * 4


def is_oom(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def ring_check(n: int, dtype) -> float:
    """Relative error of ring attention on `n` devices (model dtype) against the float32 XLA reference."""
    from lizard_jax.distributed import ring_attention
    from lizard_jax.numerics import RTOL, rel_err, scale_floor
    from lizard_jax.ops.softmax import attention

    kq, kk, kv = jax.random.split(jax.random.key(7), 3)
    t = 2048 + 37
    q = jax.random.normal(kq, (1, t, 8, 64), dtype)
    k, v = (jax.random.normal(x, (1, t, 2, 64), dtype) for x in (kk, kv))
    out = jax.jit(lambda q, k, v: ring_attention(q, k, v, mesh=sub_mesh(n)))(q, k, v)
    f32 = lambda x: x.astype(jnp.float32)
    floor = scale_floor(dtype, RTOL[jnp.dtype(dtype).name])  # bf16 on a GPU: its inputs' rounding, globally
    return rel_err(out, attention(f32(q), f32(k), f32(v), impl="xla"), floor=floor)


def speed_table(a) -> list[list]:
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    devices = [int(x) for x in a.devices.split(",")] if a.devices else [jax.device_count()]
    modes = a.modes.split(",")
    runs = [("global", 1)] if "global" in modes else []
    runs += [(m, n) for n in devices for m in modes if m != "global"]
    rows = []
    for name in a.models.split(","):
        label, cfg = model_config(name, dtype)
        model = Transformer(cfg)
        host_params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
        for mode, n in runs:
            mesh = sub_mesh(n)
            params = replicate(host_params, mesh)
            for length in [int(x) for x in a.lengths.split(",")]:
                row = [label, length, mode, n]
                try:
                    opts = dict(mode="star" if mode == "star" else "ring")  # global: ring on one device
                    r = bench_one(model, params, mesh, opts, length, a.gen, a.query, a.reps)
                    mem = "n/a" if r["mem"] is None else round(r["mem"] / 2**20)
                    rows.append(row + [r["ttft"], r["tok_s"], mem, merge_bytes(cfg, n)])
                except Exception as e:  # one failing config must not end the run
                    rows.append(row + ["OOM" if is_oom(e) else f"error: {type(e).__name__}", "", "", ""])
                    print(f"[{label} {length} {mode} x{n}] {str(e).splitlines()[0][:300]}", file=sys.stderr)
                jax.clear_caches()
                gc.collect()
                print(rows[-1], flush=True)
            del params
    return rows


# ------------------------------------------------------------------------------------------------- passkey


def passkey_accuracy(generate_fn, tokenizer, text: str, *, length: int = 8192,
                     depths=(0.0, 0.25, 0.5, 0.75, 1.0), seed: int = 0, batch: int | None = None) -> dict:
    """Passkey retrieval (prompts as `eval.passkey.build_prompt`: a random 5-digit key at each depth in a slice
    of `text`), `batch` prompts per call (default: all depths at once). generate_fn(tokens, positions) ->
    generated ids `[B, new tokens]` (-1 after EOS). Returns accuracy and the answers."""
    from lizard_jax.eval.passkey import build_prompt

    rng = np.random.default_rng(seed)
    filler = tokenizer(text, add_special_tokens=False)["input_ids"]
    keys, prompts = [], []
    for depth in depths:
        key = int(rng.integers(10000, 100000))
        start = int(rng.integers(0, max(1, len(filler) - length)))
        keys.append(key)
        prompts.append(build_prompt(tokenizer, filler[start:], length, depth, key))
    batch = batch or len(prompts)
    out = np.concatenate([np.asarray(generate_fn(*left_pad(prompts[i:i + batch], 0)))
                          for i in range(0, len(prompts), batch)])
    answers = [tokenizer.decode([t for t in row if t >= 0], skip_special_tokens=True) for row in out]
    correct = [bool((m := re.search(r"\d{5}", ans)) and int(m.group()) == k) for ans, k in zip(answers, keys)]
    return {"accuracy": float(np.mean(correct)), "correct": correct, "answers": answers, "keys": keys}


def cp_generate_fn(model, params, mesh, max_new_tokens: int = 8, eos_ids=(), **opts):
    """A generate_fn for `passkey_accuracy` through `generate_context_parallel`."""
    key = jax.random.key(0)
    return lambda tokens, positions: generate_context_parallel(
        model, params, tokens, positions, key, mesh=mesh, max_new_tokens=max_new_tokens,
        sampling=SamplingConfig(), eos_ids=tuple(eos_ids), **opts)


def passkey_table(a) -> list[list]:
    import lizard_jax

    model, params, tok = lizard_jax.load(a.passkey_ckpt)
    text = read_text(DATA / "state_union" / "state_union.txt.xz")
    eos = tuple(model.cfg.eos_token_ids)
    devices = [int(x) for x in a.devices.split(",")] if a.devices else [jax.device_count()]
    runs = [("global", 1, dict(mode="ring"))]
    runs += [(f"star (block C/{n}, anchor = block)", n, dict(mode="star")) for n in devices]
    runs += [(f"star, no anchor (block C/{n})", n, dict(mode="star", anchor="none")) for n in devices]
    rows, base = [], None
    for label, n, opts in runs:
        mesh = sub_mesh(n)
        fn = cp_generate_fn(model, replicate(params, mesh), mesh, eos_ids=eos, **opts)
        r = passkey_accuracy(fn, tok, text, length=a.passkey_length)
        base = r["accuracy"] if base is None else base
        rows.append([label, n, a.passkey_length, r["accuracy"], r["accuracy"] / base if base else "n/a"])
        print(rows[-1], r["answers"], flush=True)
    return rows


def main():
    a = ARGS
    title_dev = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    check = {n: ring_check(n, dtype) for n in ([int(x) for x in a.devices.split(",")] if a.devices
                                               else [jax.device_count()])}
    print("ring attention vs float32 reference, relative error:", check, flush=True)
    rows = speed_table(a)
    headers = ["model", "context", "mode", "devices", "TTFT s", "decode tok/s", "compiled MiB/device",
               "merge bytes/token/device"]
    notes = (f"batch 1, {a.query} query tokens, {a.gen} generated tokens (greedy, EOS off), median of {a.reps}; "
             f"star = Star Attention, block = context/devices, anchor = first block; ring = {RING_NAME}; "
             f"global = the same code on one device (exact causal attention, cuDNN on a GPU); "
             f"merge bytes analytic (per layer and head: one fp32 vector + 2 fp32 scalars); "
             f"ring check (T=2085, {jnp.dtype(dtype).name} vs float32 reference, rel err by devices): "
             + ", ".join(f"{n}: {e:.1e}" for n, e in check.items()))
    (print if a.no_report else lambda *x: None)(rows)
    if not a.no_report:
        report(f"Star vs ring vs global: prefill + generation ({title_dev})", headers, rows, notes)
    if a.passkey_ckpt:
        prow = passkey_table(a)
        ph = ["method", "devices", "prompt tokens", "passkey accuracy", "relative to global"]
        pnotes = "SmolLM2-135M teacher, 5-digit key at depths 0/0.25/0.5/0.75/1, state_union text, query = last 64"
        if a.no_report:
            print(ph, prow)
        else:
            report(f"Star passkey accuracy ({title_dev})", ph, prow, pnotes)


if __name__ == "__main__":
    main()
