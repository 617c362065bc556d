"""train.py on a tiny random teacher: both stages, LoRA scope, exact resume, kill -9, bad checkpoints, sharding."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import lizard_jax
from lizard_jax.config import ConfigError
from lizard_jax.numerics import assert_close
from lizard_jax.testing import save_tiny_teacher
from lizard_jax.textio import read_text
from lizard_jax.train import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "data" / "tinyshakespeare" / "input.txt.xz"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher")
    save_tiny_teacher(d / "ck", num_layers=2)
    text = d / "train.txt"
    text.write_text(read_text(TEXT)[:60000])
    return d / "ck", text


def config(teacher, run_dir, **over):
    ck, text = teacher
    base = {
        "teacher": str(ck), "run_dir": str(run_dir), "dtype": "float32", "seed": 0,
        "student": {"attention": {"default": {"kind": "lizard", "window": 8, "meta_tokens": 2}}},
        "data": {"source": "text", "paths": [str(text)], "seq_len": 32, "batch_size": 8},
        "mesh": {"data": 1},
        "stage1": {"steps": 30, "lr": 3e-2, "warmup": 0.1},
        "stage2": {"steps": 6, "lr": 1e-3, "lora": {"rank": 4, "alpha": 8, "targets": ["q_proj", "k_proj", "v_proj"]}},
        "checkpoint": {"every": 3, "keep": 2, "async_save": True},
        "log_every": 1,
    }
    for k, v in over.items():
        node = base
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return base


def curve(run_dir):
    return [(r["step"], r["loss"]) for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().split("\n")[:-1])]


@pytest.fixture(scope="module")
def full_run(teacher, tmp_path_factory):
    run = tmp_path_factory.mktemp("full")
    cfg = config(teacher, run)
    out = Trainer(TrainConfig.from_dict(cfg)).run()
    return run, out, cfg


def test_stage1_loss_decreases_and_outputs_approach_teacher(full_run):
    run, _, _ = full_run
    s1 = [l for s, l in curve(run) if s <= 30]
    assert len(s1) == 30
    assert np.mean(s1[-5:]) < 0.5 * np.mean(s1[:3]), s1
    assert (run / "loss.png").is_file()


def test_stage2_changes_only_intended_params(full_run, teacher):
    run, out, _ = full_run
    _, tparams, _ = lizard_jax.load(teacher[0])
    model, sparams, tok = lizard_jax.load(out)
    assert tok is not None and model.cfg.kinds == ("lizard", "lizard")
    flat_t = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tparams)[0]}
    for path, v in jax.tree_util.tree_flatten_with_path(sparams)[0]:
        key = jax.tree_util.keystr(path)
        if key not in flat_t:
            continue  # a new Lizard parameter
        changed = not np.array_equal(np.asarray(v), np.asarray(flat_t[key]))
        lora_target = any(f"['{t}']" in key for t in ("q_proj", "k_proj", "v_proj")) and "['attn']" in key
        assert changed == lora_target, key
    metrics = curve(run)
    assert [s for s, _ in metrics][-6:] == list(range(31, 37))


def test_export_writes_an_adapter_that_rebuilds_the_student(full_run, teacher):
    """run_dir/adapter holds the new parameters and the LoRA factors only, and rebuilds the exported student."""
    run, out, _ = full_run
    info = json.loads((run / "adapter" / "adapter.json").read_text())
    assert set(info["parts"]) == {"new", "lora"} and info["parts"]["lora"]["tensors"] == 2 * 3 * 2
    model, params, tok = lizard_jax.load(run / "adapter", teacher=teacher[0])
    ref_model, ref, _ = lizard_jax.load(out)
    assert model.cfg == ref_model.cfg and tok is not None
    toks = jax.random.randint(jax.random.key(0), (2, 40), 0, model.cfg.vocab_size)
    forward = jax.jit(lambda p: model.apply({"params": p}, toks))
    assert_close(forward(params), forward(ref), rtol=1e-5)


def test_resume_reproduces_uninterrupted_curve(full_run, teacher, tmp_path, monkeypatch):
    run_full, _, _ = full_run
    cfg = config(teacher, tmp_path / "r")
    trainer = Trainer(TrainConfig.from_dict(cfg))
    calls = {"n": 0}
    real = Trainer._save

    def save_then_die(self, step, *a, **k):
        real(self, step, *a, **k)
        if step == 33:  # inside stage 2
            self.manager.wait_until_finished()
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    monkeypatch.setattr(Trainer, "_save", real)
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(TrainConfig.from_dict(cfg)).run()
    Trainer(TrainConfig.from_dict(cfg)).run(resume=True)
    a, b = curve(run_full), curve(tmp_path / "r")
    assert [s for s, _ in a] == [s for s, _ in b]
    np.testing.assert_allclose([l for _, l in b], [l for _, l in a], rtol=1e-5)


def test_kill9_then_resume(teacher, tmp_path):
    """A process killed mid-run (a checkpoint saved, the run not finished) resumes from its last complete
    checkpoint and finishes the curve."""
    cfg = config(teacher, tmp_path / "k", **{"stage1.steps": 60, "stage2.steps": 0})
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(tmp_path / "c.json")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckdir = tmp_path / "k" / "checkpoints"
    saved = lambda: [int(p.name) for p in ckdir.iterdir() if p.name.isdigit()] if ckdir.is_dir() else []
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and not any(s >= 9 for s in saved()):
        time.sleep(0.05)
    try:
        assert proc.poll() is None, f"train.py exited ({proc.returncode}) before the kill: nothing was tested"
        assert any(s >= 9 for s in saved()), f"no checkpoint >= step 9 within 240 s: {saved()}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = [s for s, _ in curve(tmp_path / "k")]
    assert before and before[-1] < 60, f"the run had finished before the kill (logged steps {before[-3:]})"
    res = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    resumed = re.search(r"resuming at global step (\d+)", res.stderr)
    assert resumed and 9 <= int(resumed.group(1)) <= before[-1], res.stderr[-2000:]
    steps = [s for s, _ in curve(tmp_path / "k")]
    assert steps == sorted(set(steps)) and steps[-1] == 60


def test_corrupt_checkpoint_is_skipped(full_run, tmp_path):
    run_full, _, cfg = full_run
    run = tmp_path / "c"
    shutil.copytree(run_full, run)
    cfg = {**cfg, "run_dir": str(run)}
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    newest = run / "checkpoints" / str(steps[-1])
    for f in newest.rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0garbage")
    t = Trainer(TrainConfig.from_dict(cfg))
    found = t._restore_latest()
    assert found is not None and found[0] == steps[-2]


def test_sharded_training_equals_single_device(teacher, tmp_path):
    runs = {}
    for name, mesh in (("one", {"data": 1}), ("eight", {"data": 2, "fsdp": 2, "tensor": 2})):
        cfg = config(teacher, tmp_path / name, mesh=mesh, **{"stage1.steps": 4, "stage2.steps": 3})
        Trainer(TrainConfig.from_dict(cfg)).run()
        runs[name] = curve(tmp_path / name)
    np.testing.assert_allclose([l for _, l in runs["eight"]], [l for _, l in runs["one"]], rtol=2e-4)


@pytest.mark.slow  # redundant: test_resume_reproduces_uninterrupted_curve, test_kill9_then_resume, test_segments.py
def test_segment_ids_training_resumes_exactly_on_a_mesh(teacher, tmp_path, monkeypatch):
    """data.segment_ids: both stages train on packed documents (batches as dicts of sharded arrays over a
    2-device data mesh), a run interrupted in stage 2 resumes to the uninterrupted curve, and the losses differ
    from the same run without segment ids (they are used)."""
    over = {"data.segment_ids": True, "mesh": {"data": 2}, "stage1.steps": 4, "stage2.steps": 3,
            "checkpoint.every": 2,
            "student.attention": {"pattern": [{"kind": "sliding_window", "window": 8, "meta_tokens": 2},
                                               {"kind": "lizard", "window": 8, "meta_tokens": 2, "chunk_size": 8}]}}
    cfg = config(teacher, tmp_path / "full", **over)
    Trainer(TrainConfig.from_dict(cfg)).run()
    full = curve(tmp_path / "full")
    assert len(full) == 7 and all(np.isfinite(l) for _, l in full)
    cfg = config(teacher, tmp_path / "cut", **over)
    real = Trainer._save

    def save_then_die(self, step, *a, **k):
        real(self, step, *a, **k)
        if step == 6:  # inside stage 2
            self.manager.wait_until_finished()
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        Trainer(TrainConfig.from_dict(cfg)).run()
    monkeypatch.setattr(Trainer, "_save", real)
    Trainer(TrainConfig.from_dict(cfg)).run(resume=True)
    np.testing.assert_allclose([l for _, l in curve(tmp_path / "cut")], [l for _, l in full], rtol=1e-5)
    cfg = config(teacher, tmp_path / "plain", **{**over, "data.segment_ids": False})
    Trainer(TrainConfig.from_dict(cfg)).run()
    rel = [abs(a - b) / abs(b) for (_, a), (_, b) in zip(curve(tmp_path / "plain"), full)]
    assert max(rel) > 1e-3, rel


def test_config_errors(teacher, tmp_path):
    cfg = config(teacher, tmp_path)
    with pytest.raises(ConfigError, match="unknown key"):
        TrainConfig.from_dict({**cfg, "stage3": {}})
    with pytest.raises(ConfigError, match="lora.targets"):
        TrainConfig.from_dict(config(teacher, tmp_path, **{"stage2.lora": {"targets": ["w_q"]}}))
    with pytest.raises(ConfigError, match="data section"):
        TrainConfig.from_dict({k: v for k, v in cfg.items() if k != "data"})
    bad = config(teacher, tmp_path / "b", **{"student.attention": {"default": "softmax"}})
    with pytest.raises(ValueError, match="converts no layer"):
        Trainer(TrainConfig.from_dict(bad))
    bad = config(teacher, tmp_path / "c", mesh={"data": 8})
    with pytest.raises(ValueError, match="not divisible"):
        Trainer(TrainConfig.from_dict({**bad, "data": {**bad["data"], "batch_size": 4}})).run()


# ----------------------------------------------------------------------------------------------------------
# Training scopes (StageConfig.train): a Lightning student whose layer 1 stays softmax


def scope_config(teacher, run_dir, stage1: dict, stage2: dict):
    return config(teacher, run_dir, **{
        "student.attention": {"default": {"kind": "lightning", "chunk_size": 8}, "layers": {1: "softmax"}},
        "data.seq_len": 16, "data.batch_size": 4, "checkpoint.every": 1, "checkpoint.async_save": False,
        "stage1": {"lr": 1e-2, **stage1}, "stage2": {"lr": 1e-2, **stage2}})


def changed_teacher_params(out, teacher) -> set[str]:
    """Paths of the teacher's parameters whose values differ in the exported student."""
    _, tparams, _ = lizard_jax.load(teacher[0])
    _, sparams, _ = lizard_jax.load(out)
    flat_s = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(sparams)[0]}
    return {jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_flatten_with_path(tparams)[0]
            if not np.array_equal(np.asarray(flat_s[jax.tree_util.keystr(k)]), np.asarray(v))}


def test_converted_layers_scope_carries_through_stage2_and_resume(teacher, tmp_path, monkeypatch):
    """Stage 1 "converted_layers" (with logit KL) trains layer 0's teacher q/k/v/o, not layer 1 (softmax) nor
    the MLPs; stage 2 "new" keeps them as stage 1 left them (carry), also when stage 2 is interrupted and
    resumed: the resumed run skips stage 1, so without the carry in its checkpoint layer 0 would be the
    teacher's again."""
    cfg = scope_config(teacher, tmp_path / "cut", {"steps": 3, "train": "converted_layers", "kd_weight": 0.5},
                       {"steps": 3, "train": "new"})
    real = Trainer._save

    def save_then_die(self, step, *a, **k):
        real(self, step, *a, **k)
        if step == 4:  # stage 2, step 1
            self.manager.wait_until_finished()
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        Trainer(TrainConfig.from_dict(cfg)).run()
    monkeypatch.setattr(Trainer, "_save", real)
    resumed = Trainer(TrainConfig.from_dict(cfg)).run(resume=True)
    assert [s for s, _ in curve(tmp_path / "cut")] == list(range(1, 7))
    want = {f"['layers_0']['attn']['{n}']['kernel']" for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert changed_teacher_params(resumed, teacher) == want


@pytest.mark.slow
def test_all_scope_trains_every_parameter(teacher, tmp_path):
    out = Trainer(TrainConfig.from_dict(scope_config(teacher, tmp_path / "all", {"steps": 0},
                                                     {"steps": 2, "train": "all"}))).run()
    _, tparams, _ = lizard_jax.load(teacher[0])
    every = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(tparams)[0]}
    assert changed_teacher_params(out, teacher) == every


def test_lora_only_scope_trains_lora_alone(teacher, tmp_path):
    """stage2.train "lora_only" (the Lizard paper's stage 2): after it, the student differs from the stage-1-only
    student in the LoRA targets alone (merged at export); the new parameters stay as stage 1 left them."""
    lora = {"rank": 2, "alpha": 4, "targets": ["q_proj"]}
    s1 = Trainer(TrainConfig.from_dict(scope_config(teacher, tmp_path / "s1", {"steps": 1}, {"steps": 0}))).run()
    lo = Trainer(TrainConfig.from_dict(scope_config(teacher, tmp_path / "lo", {"steps": 1},
                                                    {"steps": 2, "train": "lora_only", "lora": lora}))).run()
    flat = lambda out: {jax.tree_util.keystr(k): np.asarray(v)
                        for k, v in jax.tree_util.tree_flatten_with_path(lizard_jax.load(out)[1])[0]}
    a, b = flat(s1), flat(lo)
    assert a.keys() == b.keys()
    assert {k for k in a if not np.array_equal(a[k], b[k])} == {"['layers_0']['attn']['q_proj']['kernel']"}


def test_train_scope_errors(teacher, tmp_path):
    with pytest.raises(ConfigError, match="stage.train must be one of"):
        TrainConfig.from_dict(config(teacher, tmp_path, **{"stage1.train": "everything"}))
    for scope in ("lora", "lora_only"):
        with pytest.raises(ConfigError, match="needs a lora section"):
            TrainConfig.from_dict(config(teacher, tmp_path, **{"stage2": {"steps": 1, "train": scope}}))
    with pytest.raises(ConfigError, match="LoRA would be unused"):
        TrainConfig.from_dict(config(teacher, tmp_path, **{"stage2.train": "all"}))
    with pytest.raises(ConfigError, match="stage1.lora / stage1.train 'lora' is not supported"):
        TrainConfig.from_dict(config(teacher, tmp_path, **{"stage1.train": "lora", "stage1.lora": {"rank": 2}}))
    with pytest.raises(ConfigError, match="stage1.lora / stage1.train 'lora' is not supported"):
        TrainConfig.from_dict(config(teacher, tmp_path, **{"stage1.lora": {"rank": 2}}))


# ----------------------------------------------------------------------------------------------------------
# Lizard mixing scalars (alpha, gate_scale = beta): their learning-rate multiplier, metrics and plot


def test_mix_lr_mult_scales_only_the_mixing_scalars():
    """StageConfig.mix_lr_mult: 1 is the optimizer as before the option (same chain, same state); otherwise the
    Lizard layers' alpha / gate_scale updates are scaled by it and every other update is unchanged."""
    import optax

    from lizard_jax.train.config import OptimConfig, StageConfig
    from lizard_jax.train.loop import _optimizer, _schedule

    tc = TrainConfig.__new__(TrainConfig)
    object.__setattr__(tc, "optim", OptimConfig(weight_decay=0.1))
    keys = iter(jax.random.split(jax.random.key(0), 16))
    leaf = lambda *shape: jax.random.normal(next(keys), shape)
    layer = lambda: {"attn": {"alpha": leaf(3), "gate_scale": leaf(3), "feature_q": {"kernel": leaf(3, 4, 4)}}}
    params = {"new": {"layers_0": layer(), "layers_1": layer()}, "lora": {}}  # layer 1: not a Lizard layer
    grads = jax.tree_util.tree_map(lambda x: 5 * x[::-1], params)  # norm > 1: the clip is active

    def updates(mult):
        sc = StageConfig(steps=10, lr=1e-2, mix_lr_mult=mult)
        tx = _optimizer(tc, sc, [0])
        _, state = tx.update(grads, tx.init(params), params)  # step 0: warm-up from lr 0
        u, _ = tx.update(grads, state, params)
        return sc, tx, u

    sc, tx1, u1 = updates(1.0)
    o = tc.optim
    plain = optax.chain(optax.clip_by_global_norm(o.clip),
                        optax.adamw(_schedule(sc), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
    assert jax.tree_util.tree_structure(tx1.init(params)) == jax.tree_util.tree_structure(plain.init(params))
    _, state = plain.update(grads, plain.init(params), params)
    ref, _ = plain.update(grads, state, params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, u1, ref)
    assert float(np.abs(u1["new"]["layers_0"]["attn"]["gate_scale"]).min()) > 0
    for mult in (0.0, 3.0):
        _, _, u = updates(mult)
        for name in ("alpha", "gate_scale"):
            np.testing.assert_allclose(u["new"]["layers_0"]["attn"][name], mult * u1["new"]["layers_0"]["attn"][name],
                                       rtol=1e-6)
            np.testing.assert_array_equal(u["new"]["layers_1"]["attn"][name], u1["new"]["layers_1"]["attn"][name])
        for l in ("layers_0", "layers_1"):
            np.testing.assert_array_equal(u["new"][l]["attn"]["feature_q"]["kernel"],
                                          u1["new"][l]["attn"]["feature_q"]["kernel"])


def test_mix_scalars_logged_frozen_by_mix_lr_mult_0_and_plotted(teacher, tmp_path):
    """Both stages at mix_lr_mult 0: alpha and beta stay at their inits (metrics.jsonl at every record, and the
    exported student) while the feature maps train (beta starts at 0.5: at 0 frozen, the gated branch would get
    no gradient at all); stage 1 records each layer's attention MSE; the plot CLI draws the run, and two runs
    side by side."""
    from lizard_jax.train import plot

    run = tmp_path / "mix0"
    cfg = config(teacher, run, **{"student.attention.default.gate_scale_init": 0.5, "stage1.steps": 3, "stage1.mix_lr_mult": 0.0, "stage2.steps": 2,
                                  "stage2.mix_lr_mult": 0, "checkpoint.async_save": False})
    tr = Trainer(TrainConfig.from_dict(cfg))
    init = jax.device_get(tr.init_new)
    out = tr.run()
    recs = plot.read_metrics(run)
    assert [(r["stage"], r["step"]) for r in recs] == [(1, 1), (1, 2), (1, 3), (2, 4), (2, 5)]
    heads = tr.student_cfg.num_heads
    for r in recs:
        assert r["beta"] == [0.5, 0.5] and r["alpha"] == [1.0, 1.0], r
        assert r["beta_heads"] == [[0.5] * heads] * 2 and r["alpha_heads"] == [[1.0] * heads] * 2
        assert ("layer_mse" in r) == (r["stage"] == 1)
        if r["stage"] == 1:  # the stage-1 loss (mse, no KD) is the mean of the layers' MSEs
            assert len(r["layer_mse"]) == 2 and min(r["layer_mse"]) > 0
            assert np.mean(r["layer_mse"]) == pytest.approx(r["loss"], rel=1e-4)
    _, params, _ = lizard_jax.load(out)
    for i in (0, 1):
        attn, attn0 = params[f"layers_{i}"]["attn"], init[f"layers_{i}"]["attn"]
        np.testing.assert_array_equal(attn["alpha"], attn0["alpha"])
        np.testing.assert_array_equal(attn["gate_scale"], attn0["gate_scale"])
        assert not np.array_equal(np.asarray(attn["feature_q"]["w"]), np.asarray(attn0["feature_q"]["w"]))
    assert (run / "loss.png").is_file()
    assert plot.main([str(run)]) == 0 and (run / "curves.png").is_file()
    assert plot.main(["--runs", f"a={run}", f"b={run}", "--out", str(tmp_path / "cmp.png")]) == 0
    assert (tmp_path / "cmp.png").stat().st_size > 10_000


def test_mix_lr_mult_errors(teacher, tmp_path):
    with pytest.raises(ConfigError, match="mix_lr_mult must be >= 0"):
        TrainConfig.from_dict(config(teacher, tmp_path, **{"stage1.mix_lr_mult": -1.0}))
    bad = scope_config(teacher, tmp_path / "lightning", {"steps": 1, "mix_lr_mult": 2.0}, {"steps": 0})
    with pytest.raises(ConfigError, match="stage1.mix_lr_mult is 2.0 but the student has no Lizard layer"):
        Trainer(TrainConfig.from_dict(bad))
