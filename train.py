"""Linearize a teacher: two-stage distillation (attention transfer, then LoRA fine-tuning).

    python train.py --config configs/lizard_tiny.yaml [--set stage1.steps=100 --set data.batch_size=4] [--resume]

Writes into `run_dir`: checkpoints/ (Orbax, resumable), metrics.jsonl, loss.png, student/ (a normal
lizard_jax checkpoint that `lizard_jax.load` and eval.py take). Curves of one run or several side by side
(loss, stage 1's per-layer attention MSE, a Lizard student's alpha / beta per layer):
`python -m lizard_jax.train.plot RUN_DIR` or `--runs a=RUN_DIR1 b=RUN_DIR2 --out compare.png`. Multi-host: set `distributed: true` (or
`--set distributed=true`) and start the same command on every host (jax.distributed.initialize()).
"""

from __future__ import annotations

import argparse
import json
import sys

from lizard_jax import cli


@cli.command
def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="training YAML (configs/*.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    ap.add_argument("--resume", action="store_true", help="continue from the newest readable checkpoint")
    a = ap.parse_args(argv)

    from lizard_jax.config import apply_overrides, load_yaml
    from lizard_jax.train import TrainConfig, Trainer

    data = apply_overrides(load_yaml(a.config), a.set)
    tc = TrainConfig.from_dict(data)
    out = Trainer(tc, config_dict=data).run(resume=a.resume)
    print(json.dumps({"student": str(out), "run_dir": tc.run_dir}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
