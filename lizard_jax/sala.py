"""MiniCPM-SALA (arXiv 2602.11761) on any softmax teacher: training-free sparse prefill, and the measured choice
of which layers stay sparse in the 1 sparse : 3 Lightning hybrid.

Training-free sparse prefill (`sparse_teacher`): every full-causal softmax layer of an unchanged teacher becomes
an InfLLM-V2 layer with rope=True, qk_norm=False, output_gate=False and the paper's settings
(`ops.sparse.settings.PAPER`). It has exactly the teacher's parameters (q/k/v/o), so the teacher's checkpoint
loads unchanged; below the threshold it makes the teacher's own attention call (equal bit for bit without a
cache); above it, prefill and each decoded token select blocks from the cached compressed keys
(`layers/sparse.py`). Sliding-window softmax layers (already cheap) and non-softmax layers are left as they are.

    cfg = sparse_teacher(model.cfg)                     # or sparse_teacher(cfg, dense_below=4096, topk=32)
    python eval.py perplexity --checkpoint DIR --sparse-prefill ...

Measured layer choice (`select_layers`, `python -m lizard_jax.sala select`):
  1. every layer of the teacher is attention-transferred to the recipe's Lightning layer: stage 1 of the
     Trainer (`lizard_jax.train`), per-layer attention-output MSE on the teacher's own hidden states, scope
     "converted_layers" by default (SALA's stage 1: the layer's q/k/v/o train too);
  2. each layer i is scored on held-out text by the LM loss rise when ONLY layer i is linearized (every other
     layer is the teacher's): score_i = CE(teacher with layer i Lightning) - CE(teacher);
  3. the first and last layers stay sparse (`keep`), then the highest scores fill up to
     n = floor(ratio * num_layers + 0.5) sparse layers (round half up: 30 layers x 1/4 = 7.5 -> 8, as the
     paper's 8 of 32; never fewer than the kept layers). A ratio that rounds to 0 sparse layers, or a choice that
     leaves no Lightning layer, is an error. Ties go to the lower layer index.
The result is printed, saved as JSON (scores, losses, choice) and written as the recipe's attention section
(YAML; `--update-config` replaces the marked block of a train config in place).

    python -m lizard_jax.sala select --teacher DIR --recipe configs/sala_smollm2.yaml --text FILE \\
        [--steps 200] [--ratio 0.25] --out scores.json [--update-config configs/sala_smollm2.yaml]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from lizard_jax import cli
from lizard_jax.cli import InputError
from lizard_jax.config import ConfigError, ModelConfig, load_yaml, spec_from_any, to_dict
from lizard_jax.layers.lightning import LightningSpec
from lizard_jax.layers.softmax import SoftmaxSpec
from lizard_jax.layers.sparse import SparseSpec
from lizard_jax.ops.sparse.settings import PAPER
from lizard_jax.textio import read_text

PAPER_INFLLM = dataclasses.asdict(PAPER)  # InfLLM-V2 as in MiniCPM-SALA, as the options sparse_teacher takes
BEGIN, END = "# BEGIN LAYER CHOICE", "# END LAYER CHOICE"


def log(msg: str) -> None:
    print(f"[sala] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Training-free sparse prefill


def sparse_teacher(cfg: ModelConfig, impl: str | None = None, **infllm) -> ModelConfig:
    """`cfg` with every full-causal softmax layer run as InfLLM-V2 (teacher parameters unchanged). `infllm`
    overrides the paper's settings (`PAPER_INFLLM`: block_size, topk, kernel, stride, init_blocks, local_window,
    dense_below, and `selection`: "token" for the paper's per-token choice, prefill == decode; "block", the
    default for now, one choice per query block as the Pallas kernel runs). `impl` ("auto" | "pallas" | "xla";
    default: "xla" for a layer the teacher runs on XLA, else "auto") picks the sparse op's backend."""
    if impl is not None and impl not in ("auto", "pallas", "xla"):
        raise ConfigError(f"sparse_teacher: impl must be auto, pallas or xla, got {impl!r}")
    unknown = sorted(set(infllm) - set(PAPER_INFLLM))
    if unknown:
        raise ConfigError(f"sparse_teacher: unknown InfLLM-V2 option(s) {unknown}; allowed: {sorted(PAPER_INFLLM)}")
    opts = {**PAPER_INFLLM, **infllm}
    specs, n = [], 0
    for s in cfg.attention:
        if isinstance(s, SoftmaxSpec) and s.window is None:
            s = SparseSpec(rope=s.rope, qk_norm=False, output_gate=False,
                           impl=impl or ("xla" if s.impl == "xla" else "auto"), **opts)
            n += 1
        specs.append(s)
    if not n:
        raise ConfigError(f"sparse_teacher: no full-causal softmax layer to run sparse; layer kinds {cfg.kinds}")
    return cfg.replace(attention=tuple(specs))


def sparse_checkpoint_view(ckpt_dir: str | Path, out_dir: str | Path, **infllm) -> Path:
    """A checkpoint folder at `out_dir` that is `ckpt_dir` with `sparse_teacher(config)`: config.json written,
    params/ (and tokenizer/) symlinked, nothing copied. For tools that take checkpoint folders (eval.py speed).
    An earlier view at `out_dir` is replaced; any other existing folder is an error."""
    from lizard_jax.checkpoint import MARKER, read_config

    src, out = Path(ckpt_dir).absolute(), Path(out_dir)
    cfg = sparse_teacher(read_config(src), **infllm)
    if out.exists():
        if not (out / "sparse_view.json").is_file():
            raise FileExistsError(f"{out} exists and is not a sparse checkpoint view")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg.to_json(out / "config.json")
    for name in ("params", "tokenizer"):
        if (src / name).exists():
            (out / name).symlink_to(src / name, target_is_directory=True)
    (out / "sparse_view.json").write_text(json.dumps({"source": str(src), "infllm": {**PAPER_INFLLM, **infllm}}))
    shutil.copyfile(src / MARKER, out / MARKER)
    return out


# ----------------------------------------------------------------------------------------------------------
# Recipes and the layer choice


def spec_dict(spec) -> dict[str, Any]:
    return {"kind": spec.kind, **to_dict(spec)}


def recipe_attention(data: Mapping[str, Any], where: str = "recipe") -> Mapping[str, Any]:
    """The attention section of a recipe file: top-level `attention`, or `student.attention` of a train config."""
    if "attention" in data:
        return data["attention"]
    student = data.get("student")
    if isinstance(student, Mapping) and "attention" in student:
        return student["attention"]
    raise ConfigError(f"{where}: no `attention` or `student.attention` section")


def recipe_specs(attention: Mapping[str, Any], where: str = "recipe") -> tuple[LightningSpec, SparseSpec]:
    """(Lightning spec, sparse spec) of a SALA recipe's attention section: the first spec of each kind found in
    `default`, `pattern`, then `layers`."""
    if not isinstance(attention, Mapping):
        raise ConfigError(f"{where}: attention must be a mapping, got {attention!r}")
    found = [attention["default"]] if "default" in attention else []
    found += list(attention.get("pattern") or [])
    found += list((attention.get("layers") or {}).values())
    specs = [spec_from_any(s, f"{where}.attention") for s in found]
    pick = lambda cls: next((s for s in specs if isinstance(s, cls)), None)
    lightning, sparse = pick(LightningSpec), pick(SparseSpec)
    if lightning is None or sparse is None:
        raise ConfigError(f"{where}: a SALA recipe needs a lightning and a sparse spec; found kinds "
                          f"{sorted({s.kind for s in specs})}")
    return lightning, sparse


def check_teacher(cfg: ModelConfig, where: str = "teacher") -> None:
    """Layer choice needs a softmax teacher: every layer with q/k/v/o projections and full causal attention."""
    for i, s in enumerate(cfg.attention):
        if not isinstance(s, SoftmaxSpec) or s.window is not None:
            what = s.kind if not isinstance(s, SoftmaxSpec) else f"softmax with window {s.window}"
            raise ConfigError(f"{where}: layer {i} is {what}, not a full softmax layer: layer choice needs a "
                              f"softmax teacher (q/k/v/o projections in every layer); kinds {cfg.kinds}")


def num_sparse(num_layers: int, ratio: float, keep: Sequence[int] = (0, -1)) -> int:
    """How many layers stay sparse: floor(ratio * num_layers + 0.5), at least the kept ones (see module doc)."""
    if not 0 < ratio < 1:
        raise ConfigError(f"ratio must be in (0, 1), got {ratio}")
    kept = normalize_layers(keep, num_layers)
    n = math.floor(ratio * num_layers + 0.5)
    if n < 1:
        raise ConfigError(f"ratio {ratio} of {num_layers} layers rounds to 0 sparse layers: it leaves no sparse "
                          f"layer (need ratio >= {0.5 / num_layers:.4g})")
    n = max(n, len(kept))
    if n >= num_layers:
        raise ConfigError(f"{n} sparse layers of {num_layers} (ratio {ratio}, kept {sorted(kept)}) leave no "
                          "Lightning layer")
    return n


def normalize_layers(layers: Sequence[int], num_layers: int) -> set[int]:
    out = set()
    for i in layers:
        if not -num_layers <= int(i) < num_layers:
            raise ConfigError(f"layer index {i} is out of range for {num_layers} layers")
        out.add(int(i) % num_layers)
    return out


def choose_layers(scores: Sequence[float], ratio: float = 0.25, keep: Sequence[int] = (0, -1)) -> tuple[int, ...]:
    """Sparse layers (ascending): the `keep` layers, then the highest `scores` (loss rise when only that layer
    is linearized) up to `num_sparse(len(scores), ratio, keep)`; ties go to the lower index."""
    n_layers = len(scores)
    n = num_sparse(n_layers, ratio, keep)
    if not all(math.isfinite(s) for s in scores):
        raise ValueError(f"layer scores must be finite, got {list(scores)}")
    kept = normalize_layers(keep, n_layers)
    rest = sorted(set(range(n_layers)) - kept, key=lambda i: (-scores[i], i))
    return tuple(sorted(kept | set(rest[: n - len(kept)])))


def hybrid_attention(num_layers: int, sparse_layers: Sequence[int], lightning: LightningSpec,
                     sparse: SparseSpec) -> dict[str, Any]:
    """The recipe attention section (`recipes.student_config` format): Lightning by default, sparse layers
    listed."""
    layers = sorted(normalize_layers(sparse_layers, num_layers))
    return {"default": spec_dict(lightning), "layers": {i: spec_dict(sparse) for i in layers}}


def attention_yaml(section: Mapping[str, Any], indent: int = 0) -> str:
    """The attention section as YAML lines (`attention:` key included), one flow mapping per spec."""
    flow = lambda d: yaml.safe_dump(dict(d), default_flow_style=True, sort_keys=False, width=10**6).strip()
    pad = " " * indent
    lines = [f"{pad}attention:", f"{pad}  default: {flow(section['default'])}", f"{pad}  layers:"]
    lines += [f"{pad}    {i}: {flow(s)}" for i, s in section["layers"].items()]
    return "\n".join(lines) + "\n"


def update_config(path: str | Path, section: Mapping[str, Any], comment: Sequence[str] = ()) -> None:
    """Replace the block between the `# BEGIN LAYER CHOICE` and `# END LAYER CHOICE` lines of a YAML file with
    `attention:` + `section` (at the markers' indentation, after `comment` lines); the rest is kept as is."""
    path = Path(path)
    lines = path.read_text().splitlines(keepends=True)
    starts = [i for i, l in enumerate(lines) if l.strip().startswith(BEGIN)]
    ends = [i for i, l in enumerate(lines) if l.strip().startswith(END)]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ConfigError(f"{path}: need exactly one '{BEGIN}' line followed by one '{END}' line")
    b, e = starts[0], ends[0]
    indent = len(lines[b]) - len(lines[b].lstrip())
    pad = " " * indent
    body = "".join(f"{pad}# {c}\n" for c in comment) + attention_yaml(section, indent)
    text = "".join(lines[: b + 1]) + body + "".join(lines[e:])
    load_yaml_text(text, path)  # still valid YAML
    path.write_text(text)


def load_yaml_text(text: str, where) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: the updated file is not valid YAML: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# Scores: the LM loss with exactly one layer linearized


def _layer_fn(cfg: ModelConfig, params, i: int):
    """x `[batch, seq, d_model]` -> decoder layer i of `cfg` with `params` (the whole model's) applied to x."""
    from lizard_jax.models.transformer import DecoderLayer

    return lambda x: DecoderLayer(cfg, i).apply({"params": params[f"layers_{i}"]}, x, None, None)[0]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _layer_inputs(cfg: ModelConfig, params, tokens):
    """The input of every decoder layer `[num_layers, batch, seq, d_model]` for tokens `[batch, seq]`."""
    from lizard_jax.models import Transformer

    x = Transformer(cfg).apply({"params": params}, tokens, method=lambda m, t: m.embed(t))
    inputs = []
    for i in range(cfg.num_layers):
        inputs.append(x)
        x = _layer_fn(cfg, params, i)(x)
    return jnp.stack(inputs)


@functools.partial(jax.jit, static_argnames=("teacher_cfg", "student_cfg"))
def _nll_from_layer(teacher_cfg: ModelConfig, student_cfg: ModelConfig, teacher_params, student_params, x,
                    targets, layer):
    """Next-token NLL summed per row `[batch]`: x `[batch, seq, d_model]` is the teacher's input to layer
    `layer` (traced int32), which runs as the student's, the later layers as the teacher's, then the head;
    `layer` -1 with the embeddings as x: the teacher alone. Layers before `layer` are skipped (`lax.switch`:
    one compiled program for every layer)."""
    from lizard_jax.models import Transformer

    for j in range(teacher_cfg.num_layers):
        which = jnp.where(j < layer, 0, jnp.where(j == layer, 2, 1))
        x = jax.lax.switch(which, (lambda h: h, _layer_fn(teacher_cfg, teacher_params, j),
                                   _layer_fn(student_cfg, student_params, j)), x)
    logits = Transformer(teacher_cfg).apply({"params": teacher_params}, x, method=lambda m, h: m.head(h))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], axis=1)


def linearized_losses(teacher_cfg: ModelConfig, teacher_params, student_cfg: ModelConfig, student_params,
                      windows: np.ndarray, batch_size: int = 4) -> tuple[float, list[float]]:
    """(teacher CE, [CE with only layer i the student's, for each i]) over token windows `[N, seq + 1]`;
    `student_cfg` is the teacher's shape with every layer converted. The teacher's layer inputs are computed
    once per batch, so linearizing layer i reruns only layers i.. (about half the work of full passes)."""
    if student_cfg.num_layers != teacher_cfg.num_layers:
        raise ValueError(f"student has {student_cfg.num_layers} layers, teacher {teacher_cfg.num_layers}")
    n, n_layers = len(windows), teacher_cfg.num_layers
    pad = (-n) % batch_size  # full batches only: one compiled program; padded rows weigh 0
    toks = np.concatenate([windows, np.repeat(windows[:1], pad, axis=0)])
    weight = np.r_[np.ones(n), np.zeros(pad)]
    totals = np.zeros(n_layers + 1)  # [teacher, layer 0, ..., layer L-1]
    for b in range(0, len(toks), batch_size):
        batch = jnp.asarray(toks[b: b + batch_size])
        inputs, targets = _layer_inputs(teacher_cfg, teacher_params, batch[:, :-1]), batch[:, 1:]
        w = weight[b: b + batch_size]
        for layer in range(-1, n_layers):
            rows = _nll_from_layer(teacher_cfg, student_cfg, teacher_params, student_params, inputs[max(layer, 0)],
                                   targets, jnp.int32(layer))
            totals[layer + 1] += float(np.dot(np.asarray(rows, np.float64), w))
    mean = totals / (n * (windows.shape[1] - 1))
    return float(mean[0]), [float(m) for m in mean[1:]]


# ----------------------------------------------------------------------------------------------------------
# The measured choice


def _split_text(text: str, eval_fraction: float) -> tuple[str, str]:
    """(training part, held-out tail of about `eval_fraction` of the characters), cut at a blank line."""
    if not 0 < eval_fraction < 1:
        raise InputError(f"eval_fraction (--eval-fraction) must be in (0, 1), got {eval_fraction}")
    at = int(len(text) * (1 - eval_fraction))
    blank = text.find("\n\n", at)
    at = blank if blank > 0 else at
    return text[:at], text[at:]


def select_layers(teacher: str | Path, attention: Mapping[str, Any], text: str | Path, *,
                  eval_text: str | Path | None = None, steps: int = 200, lr: float = 1e-3, seq_len: int = 512,
                  batch_size: int = 8, train: str = "converted_layers", ratio: float = 0.25,
                  keep: Sequence[int] = (0, -1), seed: int = 0, dtype: str = "float32",
                  eval_tokens: int = 65536, eval_fraction: float = 0.1, run_dir: str | Path | None = None,
                  mesh: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Measure which layers stay sparse (module doc). `teacher`: a checkpoint folder (or "smollm2" / a HF folder,
    converted into run_dir); `attention`: a SALA recipe's attention section (its Lightning and sparse specs);
    `text`: training text, whose last `eval_fraction` is held out for the scores unless `eval_text` is given.
    `run_dir`: where the attention-transfer run writes (default: a temporary folder, removed). Returns the
    JSON-able result: teacher_loss, losses, scores (loss rise per layer), sparse_layers, attention (section)."""
    from lizard_jax.checkpoint import read_config
    from lizard_jax.train import TrainConfig, Trainer
    from lizard_jax.train.loop import resolve_teacher
    from lizard_jax.train.trees import join

    lightning, sparse = recipe_specs(attention)
    tmp = None
    if run_dir is None:
        tmp = run_dir = Path(tempfile.mkdtemp(prefix="sala_select_"))
    run_dir = Path(run_dir)
    try:
        teacher_dir = resolve_teacher(str(teacher), run_dir)
        tcfg = read_config(teacher_dir)
        check_teacher(tcfg, str(teacher))
        num_sparse(tcfg.num_layers, ratio, keep)  # bad ratio / keep: fail before training
        raw = read_text(text, "--text")
        if eval_text is None:
            train_text, held_out = _split_text(raw, eval_fraction)
        else:
            train_text, held_out = raw, read_text(eval_text, "--eval-text")
        run_dir.mkdir(parents=True, exist_ok=True)
        train_file = run_dir / "select_train.txt"
        train_file.write_text(train_text, encoding="utf-8")
        tc = TrainConfig.from_dict({
            "teacher": str(teacher_dir), "run_dir": str(run_dir / "transfer"), "seed": seed, "dtype": dtype,
            "student": {"attention": {"default": spec_dict(lightning)}},
            "data": {"source": "text", "paths": [str(train_file)], "seq_len": seq_len, "batch_size": batch_size},
            "mesh": dict(mesh) if mesh else {"data": 1},
            "stage1": {"steps": steps, "lr": lr, "warmup": 0.1, "loss": "mse", "train": train},
            "stage2": {"steps": 0},
            "checkpoint": {"every": max(steps, 1), "keep": 1, "async_save": False},
            "log_every": max(1, steps // 10),
            "export": str(run_dir / "transfer" / "student"),
        })
        trainer = Trainer(tc)
        t0 = time.perf_counter()
        trainer.run()
        t_transfer = time.perf_counter() - t0
        metrics = trainer.metrics_path.read_text() if trainer.metrics_path.is_file() else ""  # none at steps 0
        recs = [json.loads(l) for l in metrics.splitlines() if l]
        student_params = join(trainer.final_new, trainer.frozen)

        ids = np.asarray(trainer.tokenizer(held_out, add_special_tokens=False)["input_ids"], np.int32)
        n_win = min(len(ids) // (seq_len + 1), max(1, eval_tokens // seq_len))
        if n_win < 1:
            raise InputError(f"held-out text has {len(ids)} tokens: fewer than one window of {seq_len + 1} (give a "
                             "longer --text / --eval-text or a smaller --seq-len)")
        windows = ids[: n_win * (seq_len + 1)].reshape(n_win, seq_len + 1)
        log(f"scoring {tcfg.num_layers} layers on {n_win} held-out windows of {seq_len} tokens")
        t0 = time.perf_counter()
        base, losses = linearized_losses(trainer.teacher_cfg, trainer.teacher_params, trainer.student_cfg,
                                         student_params, windows, batch_size=min(batch_size, n_win))
        t_scoring = time.perf_counter() - t0
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    scores = [l - base for l in losses]
    chosen = choose_layers(scores, ratio, keep)
    return {
        "teacher": str(teacher), "num_layers": tcfg.num_layers, "teacher_loss": base,
        "losses": dict(enumerate(losses)), "scores": dict(enumerate(scores)), "sparse_layers": list(chosen),
        "ratio": ratio, "keep": sorted(normalize_layers(keep, tcfg.num_layers)),
        "transfer": {"steps": steps, "lr": lr, "seq_len": seq_len, "batch_size": batch_size, "train": train,
                     "seed": seed, "dtype": dtype, "tokens": steps * seq_len * batch_size,
                     "final_loss": recs[-1]["loss"] if recs else None},
        "eval_tokens": int(n_win * seq_len),
        "seconds": {"transfer": round(t_transfer, 1), "scoring": round(t_scoring, 1)},
        "attention": hybrid_attention(tcfg.num_layers, chosen, lightning, sparse),
    }


def format_scores(result: Mapping[str, Any]) -> str:
    chosen = set(result["sparse_layers"])
    lines = [f"teacher CE {result['teacher_loss']:.4f} on {result['eval_tokens']} held-out tokens",
             "layer  CE (only this layer Lightning)  rise     choice"]
    for i, loss in result["losses"].items():
        lines.append(f"{i:5d}  {loss:30.4f}  {result['scores'][i]:+.4f}  {'sparse' if i in chosen else 'lightning'}")
    return "\n".join(lines)


def choice_comment(result: Mapping[str, Any], width: int = 112) -> list[str]:
    """Comment lines for the written choice: the command, then the scores, wrapped at `width` between units
    (an option with its value, a layer with its score)."""
    def wrap(units):
        lines = [units[0]]
        for u in units[1:]:
            if len(lines[-1]) + 1 + len(u) > width:
                lines.append("  " + u)
            else:
                lines[-1] += " " + u
        return lines

    cmd = []
    for w in result["command"].split():
        if cmd and cmd[-1].startswith("--") and " " not in cmd[-1] and not w.startswith("--"):
            cmd[-1] += " " + w
        else:
            cmd.append(w)
    scores = [f"{i}: {s:+.4f}," for i, s in result["scores"].items()]
    scores[-1] = scores[-1][:-1]
    head = (f"sparse layers {list(result['sparse_layers'])}; loss rise when only that layer is Lightning "
            f"(teacher CE {result['teacher_loss']:.4f}):")
    return wrap(["MEASURED by:", *cmd]) + wrap([head, *scores])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), as Spearman's rho takes them."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for v in np.unique(x):
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def compare_selections(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """How stable the layer ranking is: Spearman's rank correlation of the per-layer scores of every pair of
    `select` results (of one teacher), over all layers and over the layers not always kept, and the overlap of
    their chosen sparse layers."""
    if len(results) < 2:
        raise InputError("compare needs at least two select results")
    n = {r["num_layers"] for r in results}
    if len(n) != 1:
        raise InputError(f"the results are of teachers with different layer counts: {sorted(n)}")
    scores = [np.array([r["scores"][k] for k in sorted(r["scores"], key=int)], np.float64) for r in results]
    free = [i for i in range(n.pop()) if i not in set(results[0]["keep"])]

    def rho(a, b):
        ra, rb = _ranks(a), _ranks(b)
        return float(np.corrcoef(ra, rb)[0, 1])

    pairs = []
    for i in range(len(results)):
        for j in range(i + 1, len(results)):
            a, b = results[i], results[j]
            pairs.append({"a": i, "b": j, "spearman": rho(scores[i], scores[j]),
                          "spearman_free": rho(scores[i][free], scores[j][free]),
                          "chosen_a": list(a["sparse_layers"]), "chosen_b": list(b["sparse_layers"]),
                          "chosen_common": sorted(set(a["sparse_layers"]) & set(b["sparse_layers"]))})
    return {"pairs": pairs, "runs": [r.get("command", "") for r in results]}


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


@cli.command
def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="python -m lizard_jax.sala", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("select", help="measure which layers stay sparse (loss rise when only that one is linear)")
    p.add_argument("--teacher", required=True, help="teacher checkpoint folder (or smollm2 / a HF folder)")
    p.add_argument("--recipe", required=True, help="SALA recipe YAML (attention, or a train config's student)")
    p.add_argument("--text", required=True, help="training text; its last --eval-fraction is held out")
    p.add_argument("--eval-text", default=None, help="held-out text for the scores (default: --text's tail)")
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--eval-tokens", type=cli.int_at_least(2), default=65536,
                   help="at most this many held-out tokens scored")
    p.add_argument("--steps", type=cli.int_at_least(0), default=200, help="attention-transfer steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seq-len", type=cli.int_at_least(2), default=512)
    p.add_argument("--batch-size", type=cli.int_at_least(1), default=8)
    p.add_argument("--train", default="converted_layers", choices=["new", "converted_layers"],
                   help="what attention transfer trains")
    p.add_argument("--ratio", type=float, default=0.25, help="fraction of sparse layers (rounded half up)")
    p.add_argument("--keep", type=_ints, default=[0, -1], help="layers always sparse (default: first,last)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--run-dir", default=None, help="keep the attention-transfer run here")
    p.add_argument("--out", required=True, help="scores and choice (JSON)")
    p.add_argument("--yaml", default=None,
                   help="write the attention section (YAML) here; default: --out with .yaml, unless --update-config")
    p.add_argument("--update-config", default=None,
                   help=f"also replace the block between '{BEGIN}' and '{END}' of this YAML file")
    c = sub.add_parser("compare", help="rank correlation of the layer scores of several select results")
    c.add_argument("results", nargs="+", help="select --out JSON files")
    a = ap.parse_args(argv)
    if a.cmd == "compare":
        out = compare_selections([json.loads(Path(f).read_text()) for f in a.results])
        for p in out["pairs"]:
            print(f"{a.results[p['a']]} vs {a.results[p['b']]}: Spearman {p['spearman']:.3f} (all layers), "
                  f"{p['spearman_free']:.3f} (layers not kept); chosen {p['chosen_a']} / {p['chosen_b']}, "
                  f"common {p['chosen_common']}", file=sys.stderr)
        print(json.dumps(out), flush=True)
        return 0
    for flag, path in (("--out", a.out), ("--yaml", a.yaml)):  # written after minutes of work: check them first
        if path and not Path(path).absolute().parent.is_dir():
            raise FileNotFoundError(f"{flag} {path}: folder {Path(path).absolute().parent} does not exist")
    if a.update_config and not Path(a.update_config).is_file():
        raise FileNotFoundError(f"--update-config {a.update_config}: no such file")
    attention = recipe_attention(load_yaml(a.recipe), a.recipe)
    result = select_layers(a.teacher, attention, a.text, eval_text=a.eval_text, steps=a.steps, lr=a.lr,
                           seq_len=a.seq_len, batch_size=a.batch_size, train=a.train, ratio=a.ratio, keep=a.keep,
                           seed=a.seed, dtype=a.dtype, eval_tokens=a.eval_tokens, eval_fraction=a.eval_fraction,
                           run_dir=a.run_dir)
    result["command"] = "python -m lizard_jax.sala " + " ".join(argv if argv is not None else sys.argv[1:])
    print(format_scores(result), file=sys.stderr)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    comment = choice_comment(result)
    written = {"sparse_layers": result["sparse_layers"], "out": a.out}
    if a.yaml or not a.update_config:
        written["yaml"] = str(Path(a.yaml) if a.yaml else Path(a.out).with_suffix(".yaml"))
        Path(written["yaml"]).write_text("".join(f"# {c}\n" for c in comment) + attention_yaml(result["attention"]))
    if a.update_config:
        update_config(a.update_config, result["attention"], comment)
        written["config"] = a.update_config
    print(json.dumps(written), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
