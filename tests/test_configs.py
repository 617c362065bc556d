"""The shipped configs: every configs/*.yaml parses through the loader its command uses and names only files inside
the repository (the README's main job on the real teacher, 2 steps per stage: tests/test_smollm2.py)."""

import json
import math
import sys
from pathlib import Path

import pytest

from lizard_jax.config import load_yaml
from lizard_jax.recipes import student_config
from lizard_jax.sala import recipe_attention, recipe_specs
from lizard_jax.testing import tiny_config
from lizard_jax.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # train.py, the entry point, lives at the repo root
import train as train_py  # noqa: E402
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
    assert train_py.main(["--config", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: " + message.format(d=tmp_path)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())

