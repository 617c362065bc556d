"""The two-stage distillation loop behind `train.py`.

Stage 1 (attention transfer): the teacher runs frozen; every converted student attention layer (kind other
than "softmax") gets the teacher's own input to that layer and is trained to reproduce the teacher layer's
output (+ optional KL of the whole student's logits to the teacher's). By default only the new attention
parameters train; the layers' losses are independent (each layer's input is the teacher's), so they train in
parallel in one step.
Stage 2 (fine-tuning): by default LoRA on the converted layers' projections plus the new parameters, next-token
cross-entropy (+ optional KL to the teacher's logits).
Each stage's `train` scope (StageConfig) picks what trains: new parameters, the converted layers whole, all
parameters, or LoRA. Parameters an earlier stage trained and this one freezes travel in the state as "carry"
(checkpointed, so a resumed stage gets them back).

Parameters are fp32 master copies; the model computes in `dtype` (bf16). Steps are jitted with NamedShardings
from the sharding rules over the configured mesh, so one command runs on a CPU, a GPU or a TPU slice.
run_dir/metrics.jsonl: one record per `log_every` steps: loss, grad_norm, lr, tokens/s (+ MFU); stage 1 adds
"layer_mse" (each converted layer's attention-output MSE, mean over the steps since the last record), and a
Lizard student "beta", "alpha" (the mixing scalars gate_scale and alpha, mean over heads) and "beta_heads",
"alpha_heads" (per head), read from the parameters at the record's step; per-layer lists, one entry per student
layer (null where it does not apply). `python -m lizard_jax.train.plot` draws them.
Checkpoints (Orbax CheckpointManager, async) hold the trainable parameters, optimizer state, step, stage and data
position; the frozen teacher weights are not duplicated there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from lizard_jax import checkpoint as ckpt_lib
from lizard_jax.cli import InputError, UserError
from lizard_jax.config import ConfigError
from lizard_jax.eval.perplexity import perplexity, windows
from lizard_jax.eval.speed import cache_bytes
from lizard_jax.layers import layer_class
from lizard_jax.loading import load
from lizard_jax.lora import init_lora, merge_lora
from lizard_jax.models import Transformer, abstract_params
from lizard_jax.models.flops import attention_params, matmul_params
from lizard_jax.recipes import new_param_mask, student_config, student_params
from lizard_jax.sharding import DEFAULT_RULES, make_mesh, param_shardings
from lizard_jax.textio import read_text
from lizard_jax.train import losses
from lizard_jax.train.config import StageConfig, TrainConfig
from lizard_jax.train.data import PackedData
from lizard_jax.train.trees import join, split

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5p": 459e12, "TPU v6 lite": 918e12}


class LossNotFinite(UserError, FloatingPointError):
    """Training diverged: a NaN or infinite loss. The run stops before checkpointing the state that produced it."""


def log(msg: str) -> None:
    print(f"[train] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# teacher


def resolve_teacher(spec: str, run_dir: Path) -> Path:
    """A lizard_jax checkpoint folder for `spec`: "smollm2" (the shipped GGUF), a checkpoint folder, or a HF
    folder / .gguf file (converted once into run_dir/teacher)."""
    from lizard_jax.convert import convert, shipped_smollm2

    p = Path(spec)
    if p.is_dir() and (p / ckpt_lib.MARKER).is_file():
        return p
    out = run_dir / "teacher"
    if (out / ckpt_lib.MARKER).is_file():
        return out
    src = shipped_smollm2() if spec == "smollm2" else p
    log(f"converting teacher {src} -> {out}")
    convert(src, out)
    return out


# ----------------------------------------------------------------------------------------------------------
# state and steps


@dataclasses.dataclass
class Stage:
    """Everything one stage's jitted step needs."""

    index: int
    cfg: StageConfig
    step_fn: Any
    tx: optax.GradientTransformation
    state_sharding: Any


def _converted_layers(cfg) -> list[int]:
    return [i for i, s in enumerate(cfg.attention) if s.kind != "softmax"]


def _schedule(sc: StageConfig):
    warm = max(int(round(sc.warmup * sc.steps)), 1)  # optax needs >= 1 warm-up and >= 1 decay step
    return optax.warmup_cosine_decay_schedule(0.0, sc.lr, warm, max(sc.steps, warm + 1),
                                              end_value=sc.lr * sc.end_lr_factor)


def _lizard_layers(cfg) -> list[int]:
    return [i for i, s in enumerate(cfg.attention) if s.kind == "lizard"]


MIX_PARAMS = ("gate_scale", "alpha")  # a Lizard layer's beta and alpha: Y = beta * Y_gate + alpha * Y_anchor


def mix_param_mask(tree, lizard_layers):
    """Boolean tree over `tree` (any nesting above `layers_<i>/attn`): True at the branch-mixing scalars
    (`MIX_PARAMS`) of the Lizard layers `lizard_layers`."""
    names = {f"layers_{i}" for i in lizard_layers}

    def pick(path, _):
        keys = [getattr(p, "key", None) for p in path]
        return len(keys) >= 3 and keys[-1] in MIX_PARAMS and keys[-2] == "attn" and keys[-3] in names

    return jax.tree_util.tree_map_with_path(pick, tree)


def _optimizer(tc: TrainConfig, sc: StageConfig, lizard_layers=()):
    """Clip, AdamW on the stage's schedule, and (`sc.mix_lr_mult` != 1) the Lizard mixing scalars' updates
    scaled by `mix_lr_mult` (at 1 the chain is exactly the one before the option, optimizer state included)."""
    o = tc.optim
    parts = [optax.clip_by_global_norm(o.clip),
             optax.adamw(_schedule(sc), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)]
    if sc.mix_lr_mult != 1.0:
        parts.append(optax.masked(optax.scale(sc.mix_lr_mult), lambda t: mix_param_mask(t, lizard_layers)))
    return optax.chain(*parts)


def stage1_loss(student: Transformer, teacher: Transformer, params, teacher_params, batch, *, loss: str = "mse",
                kd_weight: float = 0.0, kd_temperature: float = 1.0, per_layer: bool = False):
    """Stage 1 (attention transfer): each converted student layer (kind other than "softmax") gets the teacher's
    input to that layer and is scored against the teacher layer's output; the mean over those layers, plus
    `kd_weight` x KL of the whole student's logits to the teacher's. `batch` as `losses.split_batch`: with
    segment ids the teacher and the student layers run packed the same way (positions per document), padding is
    not scored, and the KL scores what the LM loss scores.

    per_layer: return (loss, layer_mse), layer_mse `[len(converted)]` the MSE of each converted layer's output
    (its loss term when `loss` is "mse"; a metric, no gradient flows through it)."""
    tokens, _, positions, seg, mask = losses.split_batch(batch)
    packed = {} if seg is None else {"segment_ids": seg}
    t_logits, inter = teacher.apply({"params": teacher_params}, tokens, positions, mutable=["intermediates"],
                                    **packed)
    inter = inter["intermediates"]
    cfg = student.cfg
    converted = _converted_layers(cfg)
    real = None if seg is None else (seg != 0).astype(jnp.float32)
    total = 0.0
    layer_mse = []
    for i in converted:
        spec = cfg.attention[i]
        h = jax.lax.stop_gradient(inter[f"layers_{i}"]["attn_in"][0])
        a = jax.lax.stop_gradient(inter[f"layers_{i}"]["attn_out"][0])
        y, _ = layer_class(spec.kind)(cfg, spec).apply({"params": params[f"layers_{i}"]["attn"]}, h, positions,
                                                       **packed)
        term = losses.attention_transfer(y, a, loss, real)
        total = total + term
        if per_layer:
            mse = term if loss == "mse" else losses.attention_transfer(y, a, "mse", real)
            layer_mse.append(jax.lax.stop_gradient(mse))
    total = total / len(converted)
    if kd_weight > 0:
        logits = student.apply({"params": params}, tokens, positions, **packed)
        total = total + kd_weight * losses.distill_kl(logits, jax.lax.stop_gradient(t_logits), kd_temperature,
                                                      mask)
    return (total, jnp.stack(layer_mse)) if per_layer else total


def stage2_loss(student: Transformer, teacher: Transformer, params, teacher_params, batch, *,
                kd_weight: float = 0.0, kd_temperature: float = 1.0):
    """Stage 2 (fine-tuning): next-token cross-entropy of the student (+ `kd_weight` x KL to the teacher's
    logits); `batch` as `losses.split_batch` (with segment ids: packed, and no target that starts a document or
    is padding is scored)."""
    tokens, targets, positions, seg, mask = losses.split_batch(batch)
    packed = {} if seg is None else {"segment_ids": seg}
    logits = student.apply({"params": params}, tokens, positions, **packed)
    out = losses.next_token_ce(logits, targets, mask)
    if kd_weight > 0:
        t_logits = jax.lax.stop_gradient(teacher.apply({"params": teacher_params}, tokens, positions, **packed))
        out = out + kd_weight * losses.distill_kl(logits, t_logits, kd_temperature, mask)
    return out


class Trainer:
    def __init__(self, tc: TrainConfig, *, config_dict: dict | None = None):
        self.tc = tc
        self.run_dir = Path(tc.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if tc.distributed:
            jax.distributed.initialize()
        try:
            self.mesh = make_mesh(tc.mesh or {"data": -1})
        except ValueError as e:  # make_mesh only validates the shape against the devices here
            raise ConfigError(f"mesh {tc.mesh}: {e}") from None
        teacher_dir = resolve_teacher(tc.teacher, self.run_dir)
        tmodel, tparams, self.tokenizer = load(teacher_dir, mesh=self.mesh)
        if self.tokenizer is None:
            raise ckpt_lib.CheckpointError(f"teacher {teacher_dir} has no tokenizer/ folder: train.py needs it to "
                                           "tokenize the training data")
        self.teacher_cfg_stored = tmodel.cfg
        self.teacher_cfg = tmodel.cfg.replace(dtype=tc.dtype)
        self.teacher = Transformer(self.teacher_cfg, remat=tc.remat)
        self.teacher_params = tparams
        self.student_cfg = student_config(self.teacher_cfg, tc.student.attention)
        self.student = Transformer(self.student_cfg, remat=tc.remat)
        self.converted = _converted_layers(self.student_cfg)
        self.lizard = _lizard_layers(self.student_cfg)
        for i, sc in ((1, tc.stage1), (2, tc.stage2)):
            if sc.mix_lr_mult != 1.0 and not self.lizard:
                raise ConfigError(f"stage{i}.mix_lr_mult is {sc.mix_lr_mult} but the student has no Lizard layer "
                                  "(whose alpha and gate_scale it scales)")
        if not self.converted:
            raise ConfigError("student.attention: the recipe converts no layer (every student layer is softmax)")
        eos = (self.teacher_cfg.eos_token_ids or (self.tokenizer.eos_token_id,))[0]
        self.eos_id = int(eos)
        self.data_axes = tuple(a for a in ("data", "fsdp") if a in self.mesh.shape)
        self.batch_sharding = NamedSharding(self.mesh, P(self.data_axes))
        self.eval_ids = None
        if tc.eval is not None:  # read and checked now: a bad eval section fails before training, not after it
            text = read_text(tc.eval.text, "eval.text")
            self.eval_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            try:
                windows(self.eval_ids, tc.eval.seq_len, tc.eval.max_tokens)
            except InputError as e:
                raise InputError(f"eval.text {tc.eval.text}: {e}") from None
        # each stage's data before the student's parameters compile: bad data fails in seconds, not minutes
        self.data = {i: self._data(i, sc) for i, sc in ((1, tc.stage1), (2, tc.stage2)) if sc.steps > 0}
        init = student_params(self.student_cfg, tparams, jax.random.key(tc.seed))
        init = jax.device_put(init, param_shardings(abstract_params(self.student_cfg), self.mesh, DEFAULT_RULES))
        self.new_mask = new_param_mask(init, tparams)
        new, self.frozen = split(init, self.new_mask)
        self.init_new = new
        self.metrics_path = self.run_dir / "metrics.jsonl"
        (self.run_dir / "train_config.json").write_text(json.dumps(config_dict or tc.to_dict(), indent=2) + "\n")
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.manager = ocp.CheckpointManager(
            (self.run_dir / "checkpoints").absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=tc.checkpoint.keep,
                                                 enable_async_checkpointing=tc.checkpoint.async_save),
        )
        self.peak = next((v for k, v in PEAK_FLOPS.items() if k in jax.devices()[0].device_kind), None)

    def _scope_mask(self, scope: str):
        """Boolean tree over the student's parameters: True where stage scope `scope` trains."""
        converted = {f"layers_{i}" for i in self.converted}

        def pick(path, is_new):
            names = [getattr(p, "key", None) for p in path]
            if scope == "all":
                return True
            if scope == "lora_only":
                return False
            if scope == "converted_layers" and names[0] in converted and names[1] == "attn":
                return True
            return bool(is_new)

        return jax.tree_util.tree_map_with_path(pick, self.new_mask)

    # ---- losses
    def _stage1_loss(self, trainable, frozen, teacher_params, batch, per_layer: bool = False):
        sc = self.tc.stage1
        return stage1_loss(self.student, self.teacher, join(trainable["new"], frozen), teacher_params, batch,
                           loss=sc.loss, kd_weight=sc.kd_weight, kd_temperature=sc.kd_temperature,
                           per_layer=per_layer)

    def _stage2_loss(self, trainable, frozen, teacher_params, batch):
        sc = self.tc.stage2
        params = join(trainable["new"], frozen)
        if trainable["lora"]:
            params = merge_lora(params, trainable["lora"], sc.lora.alpha)
        return stage2_loss(self.student, self.teacher, params, teacher_params, batch, kd_weight=sc.kd_weight,
                           kd_temperature=sc.kd_temperature)

    # ---- stage construction
    def _trainable_init(self, index: int, new, params):
        """The stage's trainable tree; `params` is the whole student (for LoRA's kernel shapes)."""
        if index == 1:
            return {"new": new}
        lora_cfg = self.tc.stage2.lora
        if self.tc.stage2.scope(2) not in ("lora", "lora_only"):
            return {"new": new, "lora": {}}
        converted = set(self.converted)
        lora = init_lora(params, lora_cfg.targets, lora_cfg.rank,
                         jax.random.key(self.tc.seed + 1), layer_filter=lambda i: i in converted)
        return {"new": new, "lora": jax.device_put(lora, NamedSharding(self.mesh, P()))}

    def _make_stage(self, index: int, trainable, carry) -> tuple[Stage, Any]:
        """The stage's jitted step and its freshly initialised state (whose shardings the step keeps); `carry`:
        parameters an earlier stage trained that this one keeps fixed (in the state only when there are any)."""
        sc = self.tc.stage1 if index == 1 else self.tc.stage2
        tx = _optimizer(self.tc, sc, self.lizard)

        def loss_fn(*args):  # (loss, metrics): stage 1 adds each converted layer's attention-output MSE
            if index == 1:
                loss, layer_mse = self._stage1_loss(*args, per_layer=True)
                return loss, {"layer_mse": layer_mse}
            return self._stage2_loss(*args), {}

        repl = NamedSharding(self.mesh, P())
        # the optimizer moments inherit their parameters' shardings through jit's propagation
        init = jax.jit(lambda t, c: {"trainable": t, "opt": tx.init(t), "step": jnp.zeros((), jnp.int32),
                                     **({"carry": c} if c else {})})
        state = init(trainable, carry)
        state_sharding = jax.tree_util.tree_map(lambda x: x.sharding, state)

        def step(state, frozen, teacher_params, batch):
            fixed = join(state.get("carry", {}), frozen)
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["trainable"], fixed, teacher_params,
                                                                           batch)
            updates, opt = tx.update(grads, state["opt"], state["trainable"])
            new_state = {"trainable": optax.apply_updates(state["trainable"], updates), "opt": opt,
                         "step": state["step"] + 1, **({"carry": state["carry"]} if "carry" in state else {})}
            return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}

        shardings = lambda tree: jax.tree_util.tree_map(lambda x: x.sharding, tree)
        step_fn = jax.jit(
            step, donate_argnums=(0,),
            in_shardings=(state_sharding, shardings(self.frozen), shardings(self.teacher_params), self.batch_sharding),
            out_shardings=(state_sharding, repl),
        )
        return Stage(index, sc, step_fn, tx, state_sharding), state

    def _data(self, index: int, sc: StageConfig) -> PackedData:
        data = PackedData(self.tc.data, self.tokenizer, self.eos_id, seed=self.tc.seed + index,
                          cache_dir=self.run_dir / "data_cache", seq_len=sc.seq_len, batch_size=sc.batch_size)
        n_dev = math.prod(self.mesh.shape[a] for a in self.data_axes)
        if data.batch_size % n_dev:
            raise ConfigError(f"stage{index}: batch size {data.batch_size} is not divisible by the {n_dev} "
                              "data-parallel devices of the mesh")
        return data

    def _global_batch(self, batch):
        """The host batch (an array, or a dict of arrays with segment ids) as global arrays over the mesh."""
        n, k = jax.process_count(), jax.process_index()

        def one(rows: np.ndarray):
            local = rows[k * len(rows) // n: (k + 1) * len(rows) // n]
            return jax.make_array_from_process_local_data(self.batch_sharding, local, rows.shape)

        return jax.tree_util.tree_map(one, batch)

    # ---- checkpoints
    def _save(self, global_step: int, stage: Stage, state, data: PackedData, force: bool = False):
        meta = {"stage": stage.index, "stage_step": int(state["step"]), "data": data.state()}
        self.manager.save(global_step, args=self.ocp.args.Composite(
            state=self.ocp.args.StandardSave(state), meta=self.ocp.args.JsonSave(meta)), force=force)

    def _restore_latest(self):
        """(global step, meta, raw restore fn) of the newest readable checkpoint, or None."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self.manager.restore(step, args=self.ocp.args.Composite(meta=self.ocp.args.JsonRestore()))
                return step, dict(meta["meta"])
            except Exception as e:  # an unreadable checkpoint: say so, fall back to an older one
                log(f"checkpoint step {step} is unreadable ({type(e).__name__}: {e}); trying an older one")
        return None

    def _restore_state(self, step: int, fresh_state):
        target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                        fresh_state)
        out = self.manager.restore(step, args=self.ocp.args.Composite(state=self.ocp.args.StandardRestore(target)))
        return out["state"]

    # ---- metrics
    def _truncate_metrics(self, upto: int):
        if not self.metrics_path.is_file():
            return
        keep = [l for l in self.metrics_path.read_text().splitlines() if l and json.loads(l)["step"] <= upto]
        self.metrics_path.write_text("".join(l + "\n" for l in keep))

    def _model_flops_per_token(self, index: int) -> float:
        """Model FLOPs per training token (matmuls; PaLM-style MFU): stage 1 runs the teacher forward (2N) and
        the converted attention layers forward and backward (6N_attn); stage 2 the whole student forward and
        backward (6N), plus the teacher forward when distilling logits."""
        n_t = matmul_params(self.teacher_cfg)
        if index == 1:
            kd = 6 * matmul_params(self.student_cfg) if self.tc.stage1.kd_weight > 0 else 0
            return 2 * n_t + 6 * attention_params(self.student_cfg) * len(self.converted) + kd
        kd = 2 * n_t if self.tc.stage2.kd_weight > 0 else 0
        return 6 * matmul_params(self.student_cfg) + kd

    # ---- main
    def run(self, resume: bool = False) -> Path:
        tc = self.tc
        s1, s2 = tc.stage1.steps, tc.stage2.steps
        if s2 > 0 and tc.stage2.scope(2) == "new":
            log("stage 2 without lora: only the new attention parameters train")
        start_stage, start_meta, start_step = 1, None, 0
        if resume:
            found = self._restore_latest()
            if found is None:
                log("no readable checkpoint: starting from scratch")
            else:
                start_step, start_meta = found
                start_stage = start_meta["stage"]
                log(f"resuming at global step {start_step} (stage {start_stage})")
        elif self.manager.all_steps():
            raise FileExistsError(f"{self.run_dir}/checkpoints has checkpoints: pass --resume, or use a new run_dir")
        self._truncate_metrics(start_step)
        params = join(self.init_new, self.frozen)
        trained = self.new_mask  # True where a stage so far trained (the new parameters count as trained)
        either = lambda a, b: jax.tree_util.tree_map(lambda x, y: bool(x or y), a, b)
        for index, steps in ((1, s1), (2, s2)):
            if steps == 0:
                continue
            sc = tc.stage1 if index == 1 else tc.stage2
            mask = self._scope_mask(sc.scope(index))
            new, rest = split(params, mask)
            carry, self.frozen = split(rest, trained)
            trained = either(trained, mask)
            if index < start_stage:
                continue
            trainable = self._trainable_init(index, new, params)
            stage, state = self._make_stage(index, trainable, carry)
            data = self.data[index]
            if start_meta is not None and index == start_stage:
                state = self._restore_state(start_step, state)
                data.restore(start_meta["data"])
                start_meta = None
            offset = 0 if index == 1 else s1
            state = self._train_stage(stage, state, data, offset, steps)
            params = join(join(state["trainable"]["new"], state.get("carry", {})), self.frozen)
            if index == 2:
                self.final_lora = state["trainable"].get("lora", {})
        self.manager.wait_until_finished()
        self.final_new, self.frozen = split(params, trained)  # everything any stage trained, and the rest
        out = self.export()
        self.plot()
        if tc.eval is not None:
            self.summarize()
        return out

    def _train_stage(self, stage: Stage, state, data: PackedData, offset: int, steps: int):
        tc = self.tc
        done = int(state["step"])
        tokens_per_step = data.batch_size * data.seq_len
        flops = self._model_flops_per_token(stage.index) * tokens_per_step
        t_last, n_last = time.perf_counter(), done
        loss_sum = 0.0  # on device: summing does not wait for the step
        layer_sum = 0.0  # stage 1: each converted layer's attention MSE, summed likewise
        with (tqdm(total=steps, initial=done, desc=f"stage {stage.index}", file=sys.stderr, dynamic_ncols=True) as bar,
              self.metrics_path.open("a") as mf):
            while done < steps:
                batch = self._global_batch(data.next_batch())
                state, m = stage.step_fn(state, self.frozen, self.teacher_params, batch)
                loss_sum = loss_sum + m["loss"]
                if "layer_mse" in m:
                    layer_sum = layer_sum + m["layer_mse"]
                done += 1
                if done % tc.log_every == 0 or done == steps:
                    loss = float(loss_sum) / (done - n_last)  # mean over the steps since the last record
                    loss_sum = 0.0
                    self._check_loss(stage, offset + done, loss)
                    now = time.perf_counter()
                    tps = (done - n_last) * tokens_per_step / (now - t_last)
                    rec = {"stage": stage.index, "step": offset + done, "stage_step": done, "loss": loss,
                           "grad_norm": float(m["grad_norm"]), "lr": float(_schedule(stage.cfg)(done - 1)),
                           "tokens_per_s": tps}
                    if self.peak:
                        rec["mfu"] = flops * (done - n_last) / (now - t_last) / self.peak
                    if "layer_mse" in m:
                        rec["layer_mse"] = self._per_layer(self.converted,
                                                           np.asarray(layer_sum) / (done - n_last))
                        layer_sum = 0.0
                    rec.update(self._mix_scalars(state))
                    mf.write(json.dumps(rec) + "\n")
                    mf.flush()
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}")
                    t_last, n_last = now, done
                bar.update(1)
                if done % tc.checkpoint.every == 0 or done == steps:
                    self._check_loss(stage, offset + done, float(loss_sum))  # steps not logged yet
                    self._save(offset + done, stage, state, data, force=done == steps)
        return state

    def _per_layer(self, layers, values) -> list:
        """One entry per student layer: `values[j]` for layer `layers[j]` (6 significant digits), None elsewhere."""
        sig = lambda x: float(f"{x:.6g}")
        out = [None] * len(self.student_cfg.attention)
        for i, v in zip(layers, values):
            out[i] = [sig(x) for x in np.ravel(v)] if np.ndim(v) else sig(v)
        return out

    def _mix_scalars(self, state) -> dict:
        """The Lizard layers' beta (param gate_scale) and alpha, read on the host from the stage's state: "beta",
        "alpha" the mean over heads per layer, "beta_heads", "alpha_heads" per head (None for other layers)."""
        if not self.lizard:
            return {}
        params = join(join(state["trainable"]["new"], state.get("carry", {})), self.frozen)
        host = jax.device_get([[params[f"layers_{i}"]["attn"][n] for i in self.lizard] for n in MIX_PARAMS])
        out = {}
        for key, vals in zip(("beta", "alpha"), host):
            vals = [np.asarray(v, np.float32) for v in vals]
            out[key] = self._per_layer(self.lizard, [v.mean() for v in vals])
            out[f"{key}_heads"] = self._per_layer(self.lizard, vals)
        return out

    def _check_loss(self, stage: Stage, global_step: int, loss: float) -> None:
        """Stop at a NaN / infinite loss (a sum over steps, so one bad step is enough), before its state is saved."""
        if math.isfinite(loss):
            return
        self.manager.wait_until_finished()
        last = self.manager.latest_step()
        kept = f"the last good checkpoint is step {last}" if last is not None else "no checkpoint was written"
        raise LossNotFinite(f"stage {stage.index}, step {global_step}: the loss is {loss} (training diverged); "
                            f"{kept} in {self.run_dir}/checkpoints. Lower stage{stage.index}.lr or raise its "
                            "warmup and train again")

    def export(self) -> Path:
        """Write the trained student as a normal lizard_jax checkpoint (LoRA merged), and beside it run_dir/adapter:
        only what differs from the teacher, LoRA as factors (lizard_jax.adapter; ~11 MiB for SmolLM2-135M)."""
        from lizard_jax import adapter

        params = join(self.final_new, self.frozen)
        lora = getattr(self, "final_lora", None)
        alpha = self.tc.stage2.lora.alpha if lora else None
        stored = self.teacher_cfg_stored
        cfg = self.student_cfg.replace(dtype=stored.dtype, param_dtype=stored.param_dtype)
        host = lambda tree: jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)).astype(cfg.param_dtype),
                                                   tree)
        out = Path(self.tc.export) if self.tc.export else self.run_dir / "student"
        ckpt_lib.save(out, cfg, host(self.trained_params()), self.tokenizer, overwrite=True)
        log(f"exported student -> {out}")
        a = adapter.save(self.run_dir / "adapter", cfg, host(params), stored, self.teacher_params,
                         lora=jax.device_get(lora) if lora else None, lora_alpha=alpha, overwrite=True,
                         source={"train_config": self.tc.to_dict()})
        log(f"student adapter ({adapter.folder_bytes(a) / 2**20:.2f} MiB) -> {a}")
        return out

    def trained_params(self):
        """The trained student's parameters (LoRA merged), on the devices; after `run`."""
        params = join(self.final_new, self.frozen)
        lora = getattr(self, "final_lora", None)
        return merge_lora(params, lora, self.tc.stage2.lora.alpha) if lora else params

    def summarize(self) -> dict:
        """Teacher and student side by side on the same evaluation tokens (`tc.eval`): perplexity, and the bytes
        of the decode state each keeps at the evaluated length (the teacher's KV cache grows with it; the
        student's linear-attention state and window do not). Printed as a table on stdout and written to
        run_dir/summary.json; after `run`."""
        ev = self.tc.eval
        models = {"teacher": (self.teacher, self.teacher_params), "student": (self.student, self.trained_params())}
        out = {"text": ev.text, "max_tokens": ev.max_tokens, "seq_len": ev.seq_len, "dtype": self.tc.dtype}
        for name, (model, params) in models.items():
            log(f"summary: {name} perplexity on the first {ev.max_tokens} tokens of {ev.text}")
            r = perplexity(model, params, self.eval_ids, seq_len=ev.seq_len, max_tokens=ev.max_tokens,
                           batch_size=ev.batch_size)
            out["scored_tokens"] = r["tokens"]
            out[name] = {"perplexity": r["perplexity"], "nll": r["nll"],
                         "decode_state_bytes": cache_bytes(model.cfg, 1, ev.seq_len)}
        out["note"] = ev.note
        (self.run_dir / "summary.json").write_text(json.dumps(out, indent=2) + "\n")
        print(format_summary(out), flush=True)
        return out

    def plot(self) -> Path | None:
        """run_dir/loss.png: the curves of metrics.jsonl (`lizard_jax.train.plot`)."""
        if not self.metrics_path.is_file():
            return None
        from lizard_jax.train.plot import plot_runs, read_metrics

        return plot_runs({self.run_dir.name: read_metrics(self.run_dir)}, self.run_dir / "loss.png")


def format_summary(s: dict) -> str:
    """The table `Trainer.summarize` prints: teacher and student columns, then the note."""
    mib = lambda b: f"{b / 2**20:.2f} MiB"
    t, st = s["teacher"], s["student"]
    rows = [("", "teacher", "student"),
            ("perplexity", f"{t['perplexity']:.3f}", f"{st['perplexity']:.3f}"),
            (f"decode state at {s['seq_len']} tokens", mib(t["decode_state_bytes"]), mib(st["decode_state_bytes"]))]
    w = max(len(r[0]) for r in rows)
    lines = [f"teacher vs student on {s['text']}: the first {s['max_tokens']} tokens in windows of {s['seq_len']} "
             f"({s['scored_tokens']} scored), {s['dtype']}"]
    lines += [f"  {a:<{w}}  {b:>12}  {c:>12}" for a, b, c in rows]
    if s["note"]:
        lines.append(s["note"])
    return "\n".join(lines)
