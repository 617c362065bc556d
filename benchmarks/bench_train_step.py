"""Distillation step throughput and MFU, and where one step's time goes.

    python -m benchmarks.bench_train_step [--models smollm2,llama1b] [--batch 8] [--seq 1024] [--steps 10]
                                          [--set KEY=VALUE ...] [--dump DIR] [--tiny] [--no-report]

Teachers have random weights in the shapes of SmolLM2-135M and Llama-3.2-1B (a step's time depends on shapes only),
saved as checkpoints with a character tokenizer; the student is `configs/lizard_smollm2.yaml`'s recipe (Lizard on
every layer) and its training settings, with `--set` overrides in `train.py`'s syntax. For each stage the step the
trainer runs (`Trainer._make_stage`: jit, donation, shardings) is timed, and beside it the parts it is made of,
each jitted alone on the same inputs, so that differences place the time (packed batches with segment ids
when the config's `data.segment_ids` is on):
  stage 1: teacher forward with the layer inputs/outputs recorded; the whole loss (teacher + student layers);
           its value_and_grad; the full step (+ clipping and AdamW);
  stage 2: student forward (loss only); value_and_grad; the full step.
MFU counts model FLOPs the trainer's way (`Trainer._model_flops_per_token`: 2N teacher + 6N converted attention
in stage 1, 6N student in stage 2) against the datasheet dense bf16 peak (989 TFLOP/s on H100/H200) and the bf16
matmul rate measured in the same run. `--dump DIR` writes each step's optimized HLO and XLA's own FLOP count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import measure_ceilings, report  # noqa: E402
from benchmarks.bench_model import LLAMA_1B  # noqa: E402
from lizard_jax.config import RopeConfig, apply_overrides  # noqa: E402
from lizard_jax.testing import save_tiny_teacher  # noqa: E402
from lizard_jax.train import TrainConfig, Trainer, losses  # noqa: E402
from lizard_jax.train.trees import join  # noqa: E402

PEAK_BF16 = 989e12
SMOLLM2 = dict(vocab_size=49152, d_model=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, ffn_dim=1536,
               tie_embeddings=True, rope={"theta": 100000.0}, max_seq_len=8192)
TINY = dict(vocab_size=97, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, ffn_dim=128,
            max_seq_len=512)
MODELS = {"smollm2": SMOLLM2, "llama1b": LLAMA_1B, "tiny": TINY}


def _median_ms(fn, reps: int) -> float:
    """Median of `reps` synchronised calls of `fn()` (already compiled), in ms."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _trainer(shape: dict, work: Path, batch: int, seq: int, overrides: list[str], tiny: bool) -> Trainer:
    if "rope" in shape:  # the shapes are ModelConfig.from_dict style
        shape = {**shape, "rope": RopeConfig(**shape["rope"])}
    save_tiny_teacher(work / "teacher", **shape)
    cfg = yaml.safe_load((ROOT / "configs" / "lizard_smollm2.yaml").read_text())
    cfg.update(teacher=str(work / "teacher"), run_dir=str(work / "run"), eval=None, mesh={"data": 1})
    cfg["data"].update(paths=["data/tinyshakespeare/input.txt.xz"], seq_len=seq, batch_size=batch)
    cfg["checkpoint"] = {"every": 10**6, "keep": 1, "async_save": False}
    if tiny:  # CPU smoke run: fp32, the xla path, a small window
        cfg["dtype"] = "float32"
        cfg["student"]["attention"]["default"].update(window=8, meta_tokens=2, feature_dim=16, impl="xla")
    cfg = apply_overrides(cfg, overrides)
    return Trainer(TrainConfig.from_dict(cfg), config_dict=cfg)


def bench_model(name: str, shape: dict, *, batch: int, seq: int, steps: int, overrides: list[str], tiny: bool,
                ceiling: float, dump: Path | None) -> list[list]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tr = _trainer(shape, Path(tmp), batch, seq, overrides, tiny)
        params = join(tr.init_new, tr.frozen)
        data = tr.data[1]
        tokens = batch * seq
        for index in (1, 2):
            trainable = tr._trainable_init(index, tr.init_new, params)
            stage, state = tr._make_stage(index, trainable, {})
            batch_arr = tr._global_batch(tr.data[index].next_batch())
            loss_fn = tr._stage1_loss if index == 1 else tr._stage2_loss
            args = (state["trainable"], tr.frozen, tr.teacher_params, batch_arr)
            parts = {}
            if index == 1:
                def teacher_forward(tp, b):
                    tokens, _, positions, seg, _ = losses.split_batch(b)
                    packed = {} if seg is None else {"segment_ids": seg}
                    _, inter = tr.teacher.apply({"params": tp}, tokens, positions, mutable=["intermediates"],
                                                **packed)
                    return jax.tree_util.tree_map(jnp.sum, inter)

                t_fwd = jax.jit(teacher_forward)
                parts["teacher forward (+ layer in/out)"] = lambda: t_fwd(tr.teacher_params, batch_arr)
            loss = jax.jit(loss_fn)
            grad = jax.jit(jax.value_and_grad(loss_fn))
            parts["loss (forward)"] = lambda: loss(*args)
            parts["loss value_and_grad"] = lambda: grad(*args)
            times = {}
            for part, fn in parts.items():
                jax.block_until_ready(fn())  # compile
                times[part] = _median_ms(fn, steps)
            # the trainer's step: state is donated, so thread it through
            holder = {"state": state}

            def step():
                holder["state"], m = stage.step_fn(holder["state"], tr.frozen, tr.teacher_params, batch_arr)
                return m

            t0 = time.perf_counter()
            jax.block_until_ready(step())
            compile_s = time.perf_counter() - t0
            times["full step (+ clip, AdamW)"] = _median_ms(step, steps)
            flops_tok = tr._model_flops_per_token(index)
            if dump is not None:
                dump.mkdir(parents=True, exist_ok=True)
                lowered = stage.step_fn.lower(holder["state"], tr.frozen, tr.teacher_params, batch_arr)
                compiled = lowered.compile()
                (dump / f"{name}-stage{index}.hlo.txt").write_text(compiled.as_text())
                cost = compiled.cost_analysis()
                cost = cost[0] if isinstance(cost, list) else cost
                xla_flops = float(cost.get("flops", float("nan")))
                (dump / f"{name}-stage{index}.cost.json").write_text(json.dumps(
                    {"xla_flops_per_step": xla_flops, "model_flops_per_step": flops_tok * tokens}, indent=1))
            for part, ms in times.items():
                full = part.startswith("full step")
                tflops = flops_tok * tokens / (ms * 1e-3) / 1e12 if full else None
                rows.append([name, index, part, ms, tokens / (ms * 1e-3) if full else "",
                             100 * tflops * 1e12 / PEAK_BF16 if full else "",
                             100 * tflops / ceiling if full and ceiling else "",
                             f"{compile_s:.1f}" if full else ""])
            del holder, state
        del data
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,llama1b", help=f"comma-separated, of {sorted(MODELS)}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10, help="timed calls per part (median)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="train config override")
    ap.add_argument("--dump", type=Path, default=None, help="write each step's optimized HLO and XLA FLOPs here")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: the tiny model, fp32, xla impl")
    ap.add_argument("--no-report", action="store_true", help="print the table; do not append it to RESULTS.md")
    a = ap.parse_args(argv)
    names = ["tiny"] if a.tiny else a.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {sorted(MODELS)}")
    ceiling = 0.0 if a.tiny else measure_ceilings()["matmul_tflops"]
    rows = []
    for n in names:
        rows += bench_model(n, MODELS[n], batch=a.batch, seq=a.seq, steps=a.steps, overrides=a.set, tiny=a.tiny,
                            ceiling=ceiling, dump=a.dump)
    headers = ["teacher shape", "stage", "part", "ms", "tokens/s", "MFU % (989)", "% of measured matmul",
               "compile s"]
    title = f"Distillation step, Lizard student, batch {a.batch} x {a.seq}"
    notes = (f"measured bf16 matmul {ceiling:.0f} TFLOP/s; " if ceiling else "") + \
        "parts are jitted alone on the same inputs; random weights in the named shapes"
    if a.no_report:
        from benchmarks.common import format_table

        print(format_table(headers, rows))
    else:
        report(title, headers, rows, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
