"""Student adapters: a student checkpoint that holds only what differs from its teacher.

    python -m lizard_jax.adapter extract STUDENT_DIR --teacher TEACHER_DIR --out ADAPTER_DIR
    python -m lizard_jax.adapter merge ADAPTER_DIR --teacher TEACHER_DIR --out FULL_DIR
    model, params, tok = lizard_jax.load(ADAPTER_DIR, teacher=TEACHER_DIR)

An adapter folder is written atomically like a checkpoint (checkpoint.write_folder) and holds
  lizard_jax.json   {"format": "lizard_jax.adapter", "version": 1}
  config.json       the student's ModelConfig (the recipe's per-layer attention schedule)
  adapter.json      the teacher's identity (architecture, config, every parameter's shape and dtype, SHA-256 of
                    its weights, `params_hash`) and what the parts hold
  params/           Orbax tree of up to three parts:
    new       student parameters the teacher does not have (or has with another shape), stored whole
    lora      low-rank deltas of teacher kernels {layers_i: {attn|mlp: {proj: {a [in, r], b [r, out]}}}}, fp32,
              kernel = teacher kernel + a @ b (the LoRA scale alpha / rank is folded into b)
    changed   other teacher parameters the student changed (norms, kernels without an exact low-rank delta),
              stored whole
The student is the teacher's parameters with `changed` and `new` put in and every `lora` delta added
(`lora.merge_lora`). Loading checks the teacher's shapes, then its hash, and refuses another teacher.
The tokenizer is the teacher's.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lizard_jax import checkpoint, cli
from lizard_jax.checkpoint import ADAPTER_FORMAT, CheckpointError
from lizard_jax.config import ModelConfig
from lizard_jax.lora import IN_AXES, merge_lora
from lizard_jax.models import Transformer, abstract_params
from lizard_jax.sharding import DEFAULT_RULES, param_shardings

FORMAT = {"format": ADAPTER_FORMAT, "version": 1}
INFO = "adapter.json"


# ----------------------------------------------------------------------------------------------------------
# trees as {("layers_0", "attn", "q_proj", "kernel"): array}


def _flat(tree) -> dict[tuple[str, ...], Any]:
    return {tuple(str(getattr(k, "key", k)) for k in path): x
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for keys, x in flat.items():
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = x
    return out


def _host(x) -> np.ndarray:
    return np.ascontiguousarray(jax.device_get(x))


def params_hash(params) -> str:
    """SHA-256 of a parameter tree: for each leaf in sorted path order, its path, dtype and shape (as JSON), then
    its C-order bytes. Independent of devices, sharding and the Orbax file layout; one leaf on the host at a time."""
    h = hashlib.sha256()
    for keys, x in sorted(_flat(params).items()):
        a = _host(x)
        h.update(json.dumps(["/".join(keys), a.dtype.name, list(a.shape)]).encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def teacher_identity(cfg: ModelConfig, params) -> dict[str, Any]:
    """What an adapter records of its teacher: architecture, config, each parameter's shape/dtype, weights hash."""
    return {
        "architecture": cfg.architecture,
        "config": cfg.to_dict(),
        "params": {"/".join(k): {"shape": list(x.shape), "dtype": np.dtype(x.dtype).name}
                   for k, x in sorted(_flat(params).items())},
        "sha256": params_hash(params),
    }


def check_teacher(identity: dict[str, Any], cfg: ModelConfig, params, where: str = "teacher") -> None:
    """Raise CheckpointError unless `params` are the teacher described by `identity` (shapes first, then hash)."""
    want = identity["params"]
    got = {"/".join(k): {"shape": list(x.shape), "dtype": np.dtype(x.dtype).name}
           for k, x in _flat(params).items()}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    bad = [f"{k}: {got[k]['shape']} {got[k]['dtype']} != {want[k]['shape']} {want[k]['dtype']}"
           for k in sorted(set(want) & set(got)) if got[k] != want[k]]
    arch = f"{identity['architecture']}, {identity['config']['num_layers']} layers, d={identity['config']['d_model']}"
    if missing or extra or bad:
        problems = [f"{name} {v[:4]}{' ...' if len(v) > 4 else ''}"
                    for name, v in (("missing", missing), ("unexpected", extra), ("different", bad)) if v]
        raise CheckpointError(
            f"{where} is not this adapter's teacher: its parameters do not have the teacher's shapes and dtypes "
            f"(adapter made from {arch}; {where} is {cfg.architecture}, {cfg.num_layers} layers, d={cfg.d_model}): "
            + "; ".join(problems))
    digest = params_hash(params)
    if digest != identity["sha256"]:
        raise CheckpointError(
            f"{where} is not this adapter's teacher: same architecture and shapes ({arch}) but other weights "
            f"(SHA-256 {digest[:16]}... != {identity['sha256'][:16]}... recorded in the adapter)")


# ----------------------------------------------------------------------------------------------------------
# student <-> (teacher, parts)


def _low_rank(w_teacher: np.ndarray, w_student: np.ndarray, in_axes: int):
    """(a [in, k], b [k, out]) fp32 with teacher + a @ b equal to the student kernel to within its own storage
    precision (Frobenius error <= 2 eps(dtype) |student|), or None when no rank saves at least half the size."""
    d_in, d_out = math.prod(w_student.shape[:in_axes]), math.prod(w_student.shape[in_axes:])
    t = w_teacher.astype(np.float64).reshape(d_in, d_out)
    s_full = w_student.astype(np.float64).reshape(d_in, d_out)
    tol = 2 * float(np.finfo(w_student.dtype).eps) * np.linalg.norm(s_full)
    u, sv, vt = np.linalg.svd(s_full - t, full_matrices=False)
    tail = np.sqrt(np.cumsum((sv ** 2)[::-1])[::-1])  # tail[k]: Frobenius error keeping k singular values
    k = next((i for i in range(len(sv)) if tail[i] <= tol), len(sv))
    if k * (d_in + d_out) * 4 > d_in * d_out * w_student.dtype.itemsize / 2:
        return None
    a, b = (u[:, :k] * sv[:k]).astype(np.float32), vt[:k].astype(np.float32)
    err = np.linalg.norm(t + a.astype(np.float64) @ b - s_full)  # check the fp32 factors really are that close
    return (a, b) if err <= tol else None


def _lora_key(keys: tuple[str, ...]) -> bool:
    """Does this parameter path have merge_lora's form layers_i/{attn,mlp}/{proj}/kernel?"""
    return (len(keys) == 4 and keys[0].startswith("layers_") and keys[1] in ("attn", "mlp")
            and keys[2] in IN_AXES and keys[3] == "kernel")


def diff(student_params, teacher_params, *, lora=None, lora_alpha: float | None = None) -> dict:
    """The adapter parts {new, lora, changed} (numpy) of a student relative to its teacher.

    `student_params` is the student without `lora` (lora.py factors {layer: {group: {proj: {a, b}}}}, scale
    alpha / rank); with lora=None it is the whole student, and every changed teacher kernel whose change has an
    exact low-rank form (a merged LoRA) is stored as factors."""
    flat_t = _flat(teacher_params)
    new, changed, low = {}, {}, {}
    for keys, x in _flat(student_params).items():
        s = _host(x)
        t = flat_t.get(keys)
        if t is None or tuple(t.shape) != s.shape:
            new[keys] = s
            continue
        t = _host(t)
        if t.dtype == s.dtype and np.array_equal(t, s):
            continue
        ab = _low_rank(t, s, IN_AXES[keys[2]]) if _lora_key(keys) and t.dtype == s.dtype else None
        if ab is None:
            changed[keys] = s
        else:
            low[keys[:3]] = ab
    flat_lora = _flat(lora or {})
    for keys, f in flat_lora.items():
        if keys[-1] != "a":
            continue
        a, b = _host(f), _host(flat_lora[keys[:-1] + ("b",)])
        b = (b * (lora_alpha / a.shape[1])).astype(np.float32)
        if keys[:-1] in low:  # a low-rank change before LoRA: the sum of both is one low-rank delta
            a0, b0 = low[keys[:-1]]
            a, b = np.concatenate([a0, a], axis=1), np.concatenate([b0, b], axis=0)
        low[keys[:-1]] = (a.astype(np.float32), b)
    parts = {"new": _nest(new), "changed": _nest(changed),
             "lora": _nest({k + (n,): v for k, ab in low.items() for n, v in zip("ab", ab)})}
    return {k: v for k, v in parts.items() if v}  # Orbax cannot store empty subtrees


def rebuild(student_cfg: ModelConfig, teacher_params, parts: dict):
    """The full student parameters from its teacher's and the adapter parts."""
    flat_t, put = _flat(teacher_params), {**_flat(parts.get("changed", {})), **_flat(parts.get("new", {}))}

    def pick(path, _):
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        if keys in put:
            return put[keys]
        if keys not in flat_t:
            raise CheckpointError(f"adapter has no {'/'.join(keys)} and the teacher neither: a corrupt adapter")
        return flat_t[keys]

    params = jax.tree_util.tree_map_with_path(pick, nn.unbox(abstract_params(student_cfg)))
    if "lora" in parts:
        params = merge_lora(params, parts["lora"], None)
    checkpoint.check_params(student_cfg, params, what="rebuilt student parameters")
    return params


# ----------------------------------------------------------------------------------------------------------
# folders


def save(out_dir: str | Path, student_cfg: ModelConfig, student_params, teacher_cfg: ModelConfig, teacher_params,
         *, lora=None, lora_alpha: float | None = None, overwrite: bool = False,
         source: dict[str, Any] | None = None) -> Path:
    """Write the adapter of a student (see `diff` for `lora`) at `out_dir`. `source`: JSON-able provenance
    (e.g. the training config) recorded in adapter.json."""
    if lora and lora_alpha is None:
        raise ValueError("LoRA factors need their lora_alpha (the scale is alpha / rank)")
    checkpoint.check_params(teacher_cfg, teacher_params, what="teacher parameters")
    checkpoint.check_params(student_cfg, student_params, what="student parameters")
    parts = diff(student_params, teacher_params, lora=lora, lora_alpha=lora_alpha)
    info = {
        "teacher": teacher_identity(teacher_cfg, teacher_params),
        "parts": {k: {"tensors": len(_flat(v)), "values": int(sum(x.size for x in _flat(v).values()))}
                  for k, v in parts.items()},
        **({"source": source} if source else {}),
    }

    def fill(tmp: Path):
        student_cfg.to_json(tmp / "config.json")
        (tmp / INFO).write_text(json.dumps(info, indent=1) + "\n")
        if parts:
            checkpoint.save_tree(tmp / "params", parts)

    return checkpoint.write_folder(out_dir, fill, FORMAT, overwrite=overwrite)


def read_info(adapter_dir: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """(student config, adapter.json) of an adapter folder."""
    adapter_dir = Path(adapter_dir)
    if checkpoint.read_format(adapter_dir)["format"] != ADAPTER_FORMAT:
        raise CheckpointError(f"{adapter_dir} is a full checkpoint, not a student adapter")
    try:
        info = json.loads((adapter_dir / INFO).read_text())
        missing = {"architecture", "config", "params", "sha256"} - set(info["teacher"])
        if missing or not isinstance(info["parts"], dict):
            raise KeyError(f"teacher {sorted(missing)} / parts")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{adapter_dir}/{INFO} is missing or corrupt: {type(e).__name__}: {e}") from None
    return checkpoint._config_json(adapter_dir), info


def load(adapter_dir: str | Path, teacher_dir: str | Path, *, mesh=None, rules=None, dtype: str | None = None,
         tokenizer: bool = True):
    """(model, params, tokenizer) of the student rebuilt from `teacher_dir` and the adapter (`lizard_jax.load`)."""
    adapter_dir, teacher_dir = Path(adapter_dir), Path(teacher_dir)
    cfg, info = read_info(adapter_dir)
    teacher_cfg = checkpoint.read_config(teacher_dir)
    teacher_params = checkpoint.restore_params(teacher_dir / "params", teacher_cfg, mesh=mesh, rules=rules)
    check_teacher(info["teacher"], teacher_cfg, teacher_params, where=f"teacher {teacher_dir}")
    parts = checkpoint.restore_tree(adapter_dir / "params") if info["parts"] else {}
    if set(parts) != set(info["parts"]):
        raise CheckpointError(f"{adapter_dir}/params holds parts {sorted(parts)}, {INFO} lists {sorted(info['parts'])}")
    if mesh is not None:  # replicated beside the sharded teacher, so that merge_lora's sums are on one mesh
        parts = jax.device_put(parts, NamedSharding(mesh, PartitionSpec()))
    params = rebuild(cfg, teacher_params, parts)
    if mesh is not None:
        params = jax.device_put(params, param_shardings(abstract_params(cfg), mesh, rules or DEFAULT_RULES))
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    tok = checkpoint.load_tokenizer(teacher_dir) if tokenizer else None
    return Transformer(cfg), params, tok


def extract(student_dir: str | Path, teacher_dir: str | Path, out_dir: str | Path, *,
            overwrite: bool = False) -> Path:
    """The adapter of a full student checkpoint relative to its teacher checkpoint."""
    scfg = checkpoint.read_config(student_dir)
    tcfg = checkpoint.read_config(teacher_dir)
    sparams = checkpoint.restore_params(Path(student_dir) / "params", scfg)
    tparams = checkpoint.restore_params(Path(teacher_dir) / "params", tcfg)
    return save(out_dir, scfg, sparams, tcfg, tparams, overwrite=overwrite,
                source={"extracted_from": str(Path(student_dir).absolute())})


def merge(adapter_dir: str | Path, teacher_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """A standalone full checkpoint of the student (the teacher's tokenizer included)."""
    model, params, tok = load(adapter_dir, teacher_dir)
    return checkpoint.save(out_dir, model.cfg, params, tok, overwrite=overwrite)


def folder_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


@cli.command
def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="python -m lizard_jax.adapter",
                            description="Student adapters: only what a student changed in its teacher.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("extract", help="full student checkpoint -> adapter")
    ex.add_argument("student", help="full student checkpoint folder")
    mg = sub.add_parser("merge", help="adapter -> standalone full student checkpoint")
    mg.add_argument("adapter", help="adapter folder")
    for p in (ex, mg):
        p.add_argument("--teacher", required=True, help="the teacher's checkpoint folder")
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    a = ap.parse_args(argv)
    checkpoint.check_writable(a.out, a.overwrite)
    if a.cmd == "extract":
        out = extract(a.student, a.teacher, a.out, overwrite=a.overwrite)
    else:
        out = merge(a.adapter, a.teacher, a.out, overwrite=a.overwrite)
    print(f"wrote {out} ({folder_bytes(out) / 2**20:.2f} MiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
