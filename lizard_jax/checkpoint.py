"""Model checkpoints: a folder holding `config.json`, Orbax `params/` and, optionally, `tokenizer/`.

Written atomically (into a temporary sibling folder, renamed into place at the end), so an interrupted
write never leaves a folder that looks complete. `load` restores parameters straight into their shardings
(Orbax restore with abstract targets).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lizard_jax.config import ConfigError, ModelConfig

FORMAT = {"format": "lizard_jax.model", "version": 1}
MARKER = "lizard_jax.json"


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing, incomplete, corrupt or does not fit its config."""


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def check_params(cfg: ModelConfig, params, what: str = "parameters") -> None:
    """Raise a clear error if `params` (arrays or shape structs) do not have exactly cfg's names and shapes."""
    from lizard_jax.models import abstract_params

    want = nn.unbox(abstract_params(cfg))
    want_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(want)[0]}
    got_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    missing = sorted(set(want_flat) - set(got_flat))
    extra = sorted(set(got_flat) - set(want_flat))
    bad = [
        f"{k}: {tuple(got_flat[k].shape)} != {tuple(want_flat[k].shape)}"
        for k in sorted(set(want_flat) & set(got_flat))
        if tuple(got_flat[k].shape) != tuple(want_flat[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    if bad:
        problems.append(f"shape mismatch {bad[:5]}{' ...' if len(bad) > 5 else ''}")
    if problems:
        raise CheckpointError(f"{what} do not fit the model config: " + "; ".join(problems))


def save(out_dir: str | Path, cfg: ModelConfig, params, tokenizer=None, *, overwrite: bool = False,
         extra_files: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder atomically. `extra_files` maps file names to JSON-able objects."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    check_params(cfg, params)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        cfg.to_json(tmp / "config.json")
        ckptr = _checkpointer()
        ckptr.save(tmp / "params", params)
        ckptr.wait_until_finished()
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
        for name, obj in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        (tmp / MARKER).write_text(json.dumps(FORMAT) + "\n")  # written last: marks the folder complete
        if out_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, trash / "x")
            os.replace(tmp, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_config(ckpt_dir: str | Path) -> ModelConfig:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {ckpt_dir}")
    if not (ckpt_dir / MARKER).is_file():
        raise CheckpointError(
            f"{ckpt_dir} is not a complete lizard_jax checkpoint (no {MARKER}); it may be half-written or "
            "not a checkpoint at all"
        )
    try:
        return ModelConfig.from_json(ckpt_dir / "config.json")
    except (ConfigError, FileNotFoundError) as e:
        raise CheckpointError(f"{ckpt_dir}: bad config.json: {e}") from None


def restore_params(path: str | Path, cfg: ModelConfig, *, mesh=None, rules=None, dtype: str | None = None):
    """Restore an Orbax parameter tree for `cfg`, placed by the sharding rules on `mesh` (or one device)."""
    from jax.sharding import SingleDeviceSharding

    from lizard_jax.models import abstract_params
    from lizard_jax.sharding import DEFAULT_RULES, param_shardings

    path = Path(path).absolute()
    boxed = abstract_params(cfg)
    if mesh is not None:
        shardings = param_shardings(boxed, mesh, rules or DEFAULT_RULES)
    else:
        shardings = jax.tree_util.tree_map(lambda _: SingleDeviceSharding(jax.devices()[0]), nn.unbox(boxed))
    abstract = nn.unbox(boxed)
    if not path.is_dir():
        raise CheckpointError(f"no parameters at {path}")
    ckptr = _checkpointer()
    try:
        meta = ckptr.metadata(path)
        item = getattr(meta, "item_metadata", meta)
        tree = getattr(item, "tree", item)
    except Exception as e:  # orbax raises several types for missing/corrupt metadata
        raise CheckpointError(f"cannot read checkpoint metadata at {path}: {type(e).__name__}: {e}") from None
    if not tree:
        raise CheckpointError(f"cannot read checkpoint metadata at {path}: empty or missing")
    check_params(cfg, tree, what=f"checkpoint {path}")
    target = jax.tree_util.tree_map(
        lambda a, m, s: jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype) if dtype else m.dtype, sharding=s),
        abstract, tree, shardings,
    )
    try:
        return ckptr.restore(path, target)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: {type(e).__name__}: {e}") from None


def load(ckpt_dir: str | Path, mesh=None, *, rules=None, dtype: str | None = None, tokenizer: bool = True):
    """Load a checkpoint folder -> (model, params, tokenizer or None).

    `mesh`: place parameters by the sharding rules on this mesh (default: the first device).
    `dtype`: override the compute dtype of the returned model (e.g. "bfloat16").
    """
    from lizard_jax.models import Transformer

    ckpt_dir = Path(ckpt_dir)
    cfg = read_config(ckpt_dir)
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    params = restore_params(ckpt_dir / "params", cfg, mesh=mesh, rules=rules)
    tok = load_tokenizer(ckpt_dir) if tokenizer else None
    return Transformer(cfg), params, tok


def load_tokenizer(ckpt_dir: str | Path):
    path = Path(ckpt_dir) / "tokenizer"
    if not path.is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))

