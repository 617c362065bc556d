"""`lizard_jax.load`: a full checkpoint folder, or a student adapter on its teacher -> (model, params, tokenizer).

It sits above both folder formats (`checkpoint.py`, `adapter.py`, which builds on `checkpoint.py`), so neither
needs to import the other's reader.
"""

from __future__ import annotations

from pathlib import Path

from lizard_jax import adapter, checkpoint
from lizard_jax.checkpoint import ADAPTER_FORMAT, CheckpointError
from lizard_jax.cli import InputError
from lizard_jax.models import Transformer


def load(ckpt_dir: str | Path, mesh=None, *, rules=None, dtype: str | None = None, tokenizer: bool = True,
         teacher: str | Path | None = None):
    """Load a checkpoint folder -> (model, params, tokenizer or None).

    `mesh`: place parameters by the sharding rules on this mesh (default: the first device).
    `dtype`: override the compute dtype of the returned model (e.g. "bfloat16").
    `teacher`: the teacher checkpoint folder of a student adapter (`lizard_jax.adapter`): the full student is
    rebuilt from the teacher's weights and the adapter; the tokenizer is the teacher's.
    """
    ckpt_dir = Path(ckpt_dir)
    if checkpoint.read_format(ckpt_dir)["format"] == ADAPTER_FORMAT:
        if teacher is None:
            raise CheckpointError(f"{ckpt_dir} is a student adapter: it holds only what differs from its teacher; "
                                  f"pass the teacher, lizard_jax.load({str(ckpt_dir)!r}, teacher=TEACHER_DIR)")
        return adapter.load(ckpt_dir, teacher, mesh=mesh, rules=rules, dtype=dtype, tokenizer=tokenizer)
    if teacher is not None:
        raise InputError(f"{ckpt_dir} is a full checkpoint, not an adapter: it needs no teacher (teacher= / --teacher)")
    cfg = checkpoint.read_config(ckpt_dir)
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    params = checkpoint.restore_params(ckpt_dir / "params", cfg, mesh=mesh, rules=rules)
    tok = checkpoint.load_tokenizer(ckpt_dir) if tokenizer else None
    return Transformer(cfg), params, tok
