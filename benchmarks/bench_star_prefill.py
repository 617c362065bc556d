"""Star block-parallel prefill vs global causal prefill on ONE device: time to first token, side by side.

    python benchmarks/bench_star_prefill.py [--lengths 32768,65536] [--configs 8192:8192,4096:4096,8192:2048]
    python benchmarks/bench_star_prefill.py --tiny             # smoke run (tiny model, short contexts)
    python benchmarks/bench_star_prefill.py --model smollm2 --lengths 8192 --configs 2048:2048,1024:1024 --reps 1
                                                               # on a CPU (issue #17 item 6)

Random Llama-3.2-1B-shaped model (--model smollm2: SmolLM2-135M-shaped) in bf16 (float32 on a CPU), batch 1, prompt = context + 64 query tokens.
- global: global causal attention over the whole context (`jax.nn.dot_product_attention`, cuDNN on a GPU) in the
  same context-parallel code on a one-device mesh, KV kept for decoding; the query then attends over all of it.
- star block:anchor: Star Attention's phase 1 with every block on the one device, encoded as one batch of
  [anchor, block] rows (causal, cuDNN), block KV kept; the query as in global. Attention cost grows as
  T x (anchor + block) instead of T^2 / 2; projections and MLP run on T + anchor tokens (the anchor once).
TTFT = prefill + query + first greedy token, median of --reps after a compile run. "attention FLOP share" is
the analytic causal attention work relative to global's (QK^T and PV over visible pairs; 1.0 for global).
A config that fails (out of memory) is reported as such.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_star import is_oom, model_config, random_prompt, replicate, sub_mesh, time_prefill  # noqa: E402
from benchmarks.common import report  # noqa: E402
from lizard_jax.models import Transformer, init_params  # noqa: E402


def attention_pairs(length: int, block: int | None, anchor: int) -> float:
    """Visible (query, key) pairs of phase 1: global causal, or Star rows [anchor, block] (block 0 alone)."""
    if block is None:
        return length * (length + 1) / 2
    n = -(-length // block)
    row = lambda t: t * (t + 1) / 2
    return row(block) + (n - 1) * (row(anchor + block) if anchor else row(block))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="32768,65536")
    ap.add_argument("--configs", default="8192:8192,4096:4096,8192:2048,16384:2048,8192:0",
                    help="Star block:anchor pairs (anchor 0 = no anchor)")
    ap.add_argument("--query", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--model", default="llama1b", choices=["llama1b", "smollm2"],
                    help="random model of this shape (smollm2: what a 2-core CPU can time at 8K-16K)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--no-report", action="store_true")
    a = ap.parse_args(argv)
    if a.tiny:
        a.lengths, a.configs = "512,1024", "128:128,256:64,128:0"
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    label, cfg = model_config("tiny" if a.tiny else a.model, dtype)
    model = Transformer(cfg)
    mesh = sub_mesh(1)
    params = replicate(jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0)), mesh)
    runs = [("global causal", None, 0)]
    for c in a.configs.split(","):
        block, anchor = (int(x) for x in c.split(":"))
        runs.append((f"star {block}:{anchor}" if anchor else f"star {block}, no anchor", block, anchor))
    rows = []
    for length in [int(x) for x in a.lengths.split(",")]:
        tokens, positions = random_prompt(cfg, length)
        base = None
        for name, block, anchor in runs:
            opts = dict(mode="ring") if block is None else dict(
                mode="star", block_size=block, **(dict(anchor_size=anchor) if anchor else dict(anchor="none")))
            share = attention_pairs(length - a.query, block, anchor) / attention_pairs(length - a.query, None, 0)
            row = [label, length, name, share]
            try:
                t, mem = time_prefill(model, params, mesh, opts, tokens, positions, query=a.query, local=1,
                                      reps=a.reps)
                base = t if block is None else base
                rows.append(row + [t * 1e3, base / t if base else "n/a", "n/a" if mem is None else round(mem / 2**20)])
            except Exception as e:  # report a failing config and go on
                rows.append(row + ["OOM" if is_oom(e) else f"error: {type(e).__name__}", "", ""])
                print(f"[{name} {length}] {str(e).splitlines()[0][:300]}", file=sys.stderr)
            jax.clear_caches()
            gc.collect()
            print(rows[-1], flush=True)
    headers = ["model", "prompt tokens", "prefill", "attention FLOP share", "TTFT ms", "speed-up vs global",
               "compiled MiB"]
    notes = (f"batch 1, {a.query} query tokens, one device; global = exact causal attention (cuDNN on a GPU) via "
             f"the context-parallel code on a 1-device mesh; star block:anchor = Star phase 1 with all blocks as "
             f"one batch; median of {a.reps}")
    if a.no_report:
        print(headers, *rows, sep="\n")
    else:
        report("Star block-parallel prefill vs global causal prefill, one device", headers, rows, notes)


if __name__ == "__main__":
    main()
