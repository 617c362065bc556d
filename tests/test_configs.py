"""The shipped configs: every configs/*.yaml parses through the loader its command uses and names only files inside
the repository; the README's main job (configs/lizard_tiny.yaml) runs end to end on the real teacher, 2 steps per
stage, and ends with its teacher-vs-student summary."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from lizard_jax.config import load_yaml
from lizard_jax.recipes import student_config
from lizard_jax.sala import recipe_attention, recipe_specs
from lizard_jax.testing import tiny_config
from lizard_jax.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# SmolLM2-135M's shape (the shipped teacher), without its weights: the recipes index its 30 layers
SMOLLM2 = tiny_config(vocab_size=49152, d_model=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                      ffn_dim=1536)


def _in_repo(path: str) -> Path:
    p = Path(path)
    assert not p.is_absolute() and ".." not in p.parts, f"{path} points outside the repository"
    assert (ROOT / p).is_file(), f"{path} is not a file of the repository"
    return p


def test_every_shipped_config_is_listed():
    assert {p.name for p in CONFIGS} == {"lizard_tiny.yaml", "lizard_smollm2.yaml", "sala_smollm2.yaml",
                                         "sala_generic.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_parses(path):
    data = load_yaml(path)
    if "data" in data:  # a train.py config: the whole TrainConfig, its data and eval text shipped in data/
        tc = TrainConfig.from_dict(data)
        for f in (*tc.data.paths, *([tc.eval.text] if tc.eval else [])):
            assert _in_repo(f).parts[0] == "data"
        attention = tc.student.attention
    else:  # a recipe for `sala select --recipe`
        attention = recipe_attention(data, str(path))
    if path.name.startswith("sala"):
        recipe_specs(attention, str(path))
    cfg = student_config(SMOLLM2, attention)
    assert len(cfg.attention) == 30 and any(s.kind != "softmax" for s in cfg.attention)


@pytest.mark.parametrize("steps", [1, 2, 25])
@pytest.mark.parametrize("warmup", [0.0, 0.1, 1.0])
def test_every_accepted_stage_has_a_schedule(steps, warmup):
    """A stage the config accepts builds its learning-rate schedule (steps=1 with warmup 0.1 used to fail in
    optax), finite and within [0, lr] at every step."""
    from lizard_jax.train.config import StageConfig
    from lizard_jax.train.loop import _schedule

    lrs = [float(_schedule(StageConfig(steps=steps, lr=1e-3, warmup=warmup))(i)) for i in range(steps)]
    assert all(math.isfinite(x) and 0 <= x <= 1e-3 * (1 + 1e-6) for x in lrs), lrs  # fp32 rounding of lr


def _train_main():
    """train.py's `main`, loaded from the file (the repository root need not be on sys.path)."""
    spec = importlib.util.spec_from_file_location("train_py", ROOT / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_main_job_two_steps_per_stage(smollm2, tmp_path, monkeypatch, capsys):
    """configs/lizard_tiny.yaml as the README runs it (from the repository root), shortened: 2 steps per stage,
    4K training tokens, the summary on 256 WikiText-2 tokens in windows of 128; one device (as on a user's CPU;
    the suite simulates 8, and the config's batch of 2 does not split over 8). The teacher is the session's
    converted SmolLM2 (the config's `teacher: smollm2` converts the same GGUF; test_smollm2 checks that)."""
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    sets = {"run_dir": run, "teacher": smollm2[2], "mesh.data": 1, "stage1.steps": 2, "stage2.steps": 2,
            "data.max_tokens": 4096, "eval.max_tokens": 256, "eval.seq_len": 128, "eval.batch_size": 2}
    argv = ["--config", "configs/lizard_tiny.yaml"] + [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    assert _train_main()(argv) == 0
    out = capsys.readouterr().out
    s = json.loads((run / "summary.json").read_text())
    assert s["text"] == "data/wikitext-2/valid.txt.xz" and s["seq_len"] == 128 and s["scored_tokens"] == 2 * 127
    t, st = s["teacher"], s["student"]
    # the real teacher: SmolLM2-135M scores WikiText-2 in the tens (15.8 at windows of 1024); a random or
    # mis-converted one would be in the thousands
    assert 5 < t["perplexity"] < 60, t
    assert math.isfinite(st["perplexity"]) and st["perplexity"] > 1
    # the teacher's KV cache at 128 tokens: k and v, 30 layers x 3 KV heads x 64 x 128, fp32 (+ slot positions)
    assert t["decode_state_bytes"] == pytest.approx(2 * 30 * 3 * 64 * 128 * 4, rel=0.01)
    assert st["decode_state_bytes"] > 0
    assert "teacher vs student" in out and "tiny CPU demo" in out and "configs/lizard_smollm2.yaml" in out
    assert json.loads(out.strip().splitlines()[-1])["run_dir"] == str(run)  # train.py's JSON line stays last
    assert (run / "student" / "config.json").is_file()


@pytest.mark.parametrize("text, message", [
    ("missing.txt", "eval.text {d}/missing.txt: no such file"),
    ("one_token.txt", "eval.text {d}/one_token.txt: need at least 2 tokens to score, got 1"),
])
def test_bad_eval_section_fails_before_training(tmp_path, capsys, text, message):
    """The summary's text is read and checked when the trainer starts, not after the run: one error line, exit 2,
    no checkpoint written."""
    from lizard_jax.testing import save_tiny_teacher

    save_tiny_teacher(tmp_path / "teacher")
    (tmp_path / "one_token.txt").write_text("a")  # the tiny teacher's tokenizer: one character, one token
    cfg = {"teacher": str(tmp_path / "teacher"), "run_dir": str(tmp_path / "run"), "dtype": "float32",
           "student": {"attention": {"default": {"kind": "lizard", "window": 4}}}, "mesh": {"data": 1},
           "data": {"source": "text", "paths": [str(ROOT / "data" / "tinyshakespeare" / "input.txt.xz")],
                    "seq_len": 16, "batch_size": 1, "max_tokens": 2000},
           "stage1": {"steps": 2}, "eval": {"text": str(tmp_path / text), "seq_len": 8}}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert _train_main()(["--config", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: " + message.format(d=tmp_path)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())

