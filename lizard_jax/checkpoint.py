"""Model checkpoints: a folder holding `config.json`, Orbax `params/` and, optionally, `tokenizer/`.

Written atomically (into a temporary sibling folder, renamed into place at the end), so an interrupted
write never leaves a folder that looks complete. `restore_params` restores parameters straight into their
shardings (Orbax restore with abstract targets). `lizard_jax.load` (`loading.py`, above this module and
`adapter.py`) turns a folder into (model, params, tokenizer).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from lizard_jax.cli import UserError
from lizard_jax.config import ConfigError, ModelConfig
from lizard_jax.models import abstract_params
from lizard_jax.sharding import DEFAULT_RULES, param_shardings

FORMAT = {"format": "lizard_jax.model", "version": 1}
ADAPTER_FORMAT = "lizard_jax.adapter"  # lizard_jax/adapter.py
MARKER = "lizard_jax.json"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint folder that is missing, incomplete, corrupt or does not fit its config."""


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def check_params(cfg: ModelConfig, params, what: str = "parameters") -> None:
    """Raise a clear error if `params` (arrays or shape structs) do not have exactly cfg's names and shapes."""
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


def check_writable(out_dir: str | Path, overwrite: bool) -> Path:
    """`out_dir` as an absolute path if `write_folder` may write it; commands call it first, so that a refused
    output fails before the work, not after."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} is a file; the output must be a folder")
    return out_dir


def write_folder(out_dir: str | Path, fill: Callable[[Path], None], marker: dict[str, Any] | None, *,
                 overwrite: bool = False) -> Path:
    """Create folder `out_dir` atomically: `fill(tmp)` writes the content into a temporary sibling, `marker`
    (MARKER's JSON; None for a folder of another format) is written last, then the folder is renamed into place,
    so an interrupted write leaves nothing that looks complete."""
    out_dir = check_writable(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the finished folder private
    try:
        fill(tmp)
        if marker is not None:
            (tmp / MARKER).write_text(json.dumps(marker) + "\n")  # written last: marks the folder complete
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


def save_tree(path: str | Path, tree) -> None:
    """Write a tree of arrays as Orbax at `path` (a new folder) and wait until it is on disk."""
    ckptr = _checkpointer()
    ckptr.save(Path(path).absolute(), tree)
    ckptr.wait_until_finished()


def save(out_dir: str | Path, cfg: ModelConfig, params, tokenizer=None, *, overwrite: bool = False,
         extra_files: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder atomically. `extra_files` maps file names to JSON-able objects."""
    check_params(cfg, params)

    def fill(tmp: Path):
        cfg.to_json(tmp / "config.json")
        save_tree(tmp / "params", params)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
        for name, obj in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")

    return write_folder(out_dir, fill, FORMAT, overwrite=overwrite)


def read_format(ckpt_dir: str | Path) -> dict[str, Any]:
    """The folder's MARKER content ({"format": "lizard_jax.model" | "lizard_jax.adapter", "version"}); raises
    for a missing folder or a half-written one."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.is_file():
        raise NotADirectoryError(f"{ckpt_dir} is a file; expected a lizard_jax checkpoint folder")
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {ckpt_dir}")
    if not (ckpt_dir / MARKER).is_file():
        raise CheckpointError(
            f"{ckpt_dir} is not a complete lizard_jax checkpoint (no {MARKER}); it may be half-written or "
            "not a checkpoint at all"
        )
    try:
        fmt = json.loads((ckpt_dir / MARKER).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{ckpt_dir}/{MARKER} is corrupt: {e}") from None
    if not isinstance(fmt, dict) or fmt.get("format") not in (FORMAT["format"], ADAPTER_FORMAT):
        raise CheckpointError(f"{ckpt_dir}/{MARKER}: unknown checkpoint format {fmt!r}")
    return fmt


def _config_json(ckpt_dir: Path) -> ModelConfig:
    try:
        return ModelConfig.from_json(ckpt_dir / "config.json")
    except (ConfigError, FileNotFoundError) as e:
        raise CheckpointError(f"{ckpt_dir}: bad config.json: {e}") from None


def read_config(ckpt_dir: str | Path) -> ModelConfig:
    """The ModelConfig of a full checkpoint folder (an adapter is refused: its parameters need the teacher)."""
    ckpt_dir = Path(ckpt_dir)
    if read_format(ckpt_dir)["format"] == ADAPTER_FORMAT:
        raise CheckpointError(f"{ckpt_dir} is a student adapter, not a full checkpoint: load it with its teacher, "
                              f"lizard_jax.load({str(ckpt_dir)!r}, teacher=TEACHER_DIR), or write a full "
                              f"checkpoint with `python -m lizard_jax.adapter merge {ckpt_dir} --teacher "
                              "TEACHER_DIR --out DIR`")
    return _config_json(ckpt_dir)


def restore_tree(path: str | Path, target_of: Callable[[Any], Any] | None = None):
    """Restore the Orbax tree at `path` into `target_of(metadata tree)` (ShapeDtypeStructs with shardings; it may
    raise to refuse the tree before anything is read) or, without it, as stored onto the first device."""
    path = Path(path).absolute()
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
    if target_of is None:
        dev = SingleDeviceSharding(jax.devices()[0])
        target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), tree)
    else:
        target = target_of(tree)
    try:
        return ckptr.restore(path, target)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: {type(e).__name__}: {e}") from None


def restore_params(path: str | Path, cfg: ModelConfig, *, mesh=None, rules=None, dtype: str | None = None):
    """Restore an Orbax parameter tree for `cfg`, placed by the sharding rules on `mesh` (or one device)."""
    path = Path(path).absolute()
    boxed = abstract_params(cfg)
    if mesh is not None:
        shardings = param_shardings(boxed, mesh, rules or DEFAULT_RULES)
    else:
        shardings = jax.tree_util.tree_map(lambda _: SingleDeviceSharding(jax.devices()[0]), nn.unbox(boxed))
    abstract = nn.unbox(boxed)

    def target_of(tree):
        check_params(cfg, tree, what=f"checkpoint {path}")
        return jax.tree_util.tree_map(
            lambda a, m, s: jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype) if dtype else m.dtype, sharding=s),
            abstract, tree, shardings)

    return restore_tree(path, target_of)


def load_tokenizer(ckpt_dir: str | Path):
    path = Path(ckpt_dir) / "tokenizer"
    if not path.is_dir():
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception for a corrupt tokenizer.json
        raise CheckpointError(f"{path}: unreadable tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                              ) from e

