"""lm-evaluation-harness model "lizard_jax": local multiple-choice + generation tasks (JSONL + task YAML written
here) end to end, log-likelihoods against a direct forward, rolling log-likelihoods, the CLI (slow)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("lm_eval")

import lizard_jax  # noqa: E402
from lizard_jax import checkpoint  # noqa: E402
from lizard_jax.convert import from_hf_model  # noqa: E402
from lizard_jax.testing import char_tokenizer, tiny_hf_model  # noqa: E402

MC = [{"question": "2+2=", "choices": ["4", "5", "22"], "answer": 0},
      {"question": "The cat sat on the", "choices": ["mat", "moon"], "answer": 0},
      {"question": "abc", "choices": ["d", "xyz", "cba"], "answer": 0}]
GEN = [{"prompt": "Once upon a", "target": " time"}, {"prompt": "1, 2, 3,", "target": " 4"},
       {"prompt": "Hello", "target": " world"}]
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_text: "{text}"
doc_to_target: {target}
{extra}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval")
    cfg, params = from_hf_model(tiny_hf_model("llama", eos_token_id=1, bos_token_id=None))  # "[EOS]" of the tokenizer
    checkpoint.save(d / "ck", cfg, params, char_tokenizer(cfg.vocab_size))
    tasks = d / "tasks"
    tasks.mkdir()
    for name, items in (("mc", MC), ("gen", GEN)):
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    (tasks / "lj_mc.yaml").write_text(TASK.format(
        name="lj_mc", data=tasks / "mc.jsonl", output_type="multiple_choice", text="{{question}}",
        target="answer", extra='doc_to_choice: "{{choices}}"\nmetric_list:\n  - metric: acc'))
    (tasks / "lj_gen.yaml").write_text(TASK.format(
        name="lj_gen", data=tasks / "gen.jsonl", output_type="generate_until", text="{{prompt}}",
        target='"{{target}}"', extra="generation_kwargs:\n  until: [\"\\n\", \".\"]\n  max_gen_toks: 6\n"
                                     "  do_sample: false\nmetric_list:\n  - metric: exact_match"))
    return d, cfg


def _ids(tok, s: str) -> list[int]:
    return tok(s, add_special_tokens=False)["input_ids"]  # the char tokenizer: one id per character


def _reference(model, params, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
    """log p(x | c) for each (c, x): one jitted forward on all sequences right-padded to [8, 64] (causal: padding
    after a sequence does not change it; one shape, one compilation), log-softmax in float64 on the host."""
    assert len(pairs) <= 8 and all(len(c) + len(x) <= 64 for c, x in pairs)
    toks = np.zeros((8, 64), np.int32)
    for i, (c, x) in enumerate(pairs):
        toks[i, : len(c) + len(x)] = c + x
    logits = np.asarray(_forward(model, params, jnp.asarray(toks)), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return [float(sum(logp[i, len(c) - 1 + j, t] for j, t in enumerate(x))) for i, (c, x) in enumerate(pairs)]


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, toks):
    return model.apply({"params": params}, toks)


def _check_samples(d, samples):
    """Multiple-choice log-likelihoods equal a direct forward's; generations equal lizard_jax.generate's."""
    model, params, tok = lizard_jax.load(d / "ck")
    mc = samples["lj_mc"]
    assert len(mc) == len(MC) and sum(len(s["arguments"]) for s in mc) == sum(len(x["choices"]) for x in MC)
    pairs, got = [], []
    for s in mc:
        args = s["arguments"].values() if isinstance(s["arguments"], dict) else s["arguments"]
        for arg, resp in zip(args, s["resps"]):
            context, continuation = (arg["arg_0"], arg["arg_1"]) if isinstance(arg, dict) else arg
            pairs.append((_ids(tok, context), _ids(tok, continuation)))
            got.append(float(resp[0][0]))
    np.testing.assert_allclose(got, _reference(model, params, pairs), atol=1e-4, rtol=0)
    want = lizard_jax.generate(model, params, [x["prompt"] for x in GEN], tokenizer=tok, max_new_tokens=6).texts
    want = {p["prompt"]: w.split("\n")[0].split(".")[0] for p, w in zip(GEN, want)}
    assert {s["doc"]["prompt"]: s["resps"][0][0] for s in samples["lj_gen"]} == want


def test_local_tasks_score_like_the_library(setup):
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from lizard_jax.lm_eval import LizardLM

    d, _ = setup
    assert get_model("lizard_jax") is LizardLM and get_model("hf")  # registered beside lm_eval's own models
    # include_defaults=False: lm_eval would otherwise index its ~14000 task files first (30+ s)
    out = lm_eval.simple_evaluate(model="lizard_jax", model_args=f"checkpoint={d / 'ck'}", tasks=["lj_mc", "lj_gen"],
                                  task_manager=TaskManager(include_path=str(d / "tasks"), include_defaults=False),
                                  batch_size=3, log_samples=True)
    assert set(out["results"]) == {"lj_mc", "lj_gen"}
    _check_samples(d, out["samples"])
    # acc is the share of questions whose gold choice (index 0 in MC) has the highest log-likelihood
    best = [int(np.argmax([float(r[0][0]) for r in s["resps"]])) for s in out["samples"]["lj_mc"]]
    assert out["results"]["lj_mc"]["acc,none"] == pytest.approx(np.mean([b == 0 for b in best]))


@pytest.mark.slow
def test_cli_end_to_end(setup, tmp_path):
    """`python -m lizard_jax.lm_eval` as a user runs it (slow: lm_eval's CLI indexes all its tasks)."""
    import subprocess
    import sys

    d, _ = setup
    out = tmp_path / "results"
    subprocess.run([sys.executable, "-m", "lizard_jax.lm_eval", "--model", "lizard_jax", "--model_args",
                    f"checkpoint={d / 'ck'}", "--tasks", "lj_mc,lj_gen", "--include_path", str(d / "tasks"),
                    "--batch_size", "3", "--output_path", str(out), "--log_samples"], check=True)
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert set(results) == {"lj_mc", "lj_gen"}
    _check_samples(d, {t: [json.loads(x) for x in next(out.rglob(f"samples_{t}_*.jsonl")).read_text().splitlines()]
                       for t in ("lj_mc", "lj_gen")})


def test_rolling_loglikelihood_and_batches(setup):
    from lm_eval import utils as lm_utils
    from lm_eval.api.instance import Instance

    from lizard_jax.lm_eval import LizardLM

    d, _ = setup
    lm = LizardLM(str(d / "ck"), batch_size=2, max_length=96)
    model, params, tok = lm.model, lm.params, lm.tokenizer
    texts = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs!", "ok"]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    got = lm.loglikelihood_rolling(reqs, disable_tqdm=True)
    # one window each: every token given the prefix token and all before it
    want = _reference(model, params, [([lm.prefix_token_id], _ids(tok, t)) for t in texts])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # longer than max_length: lm-eval's disjoint rolling windows, each scored once
    lm.max_length = 16
    (got_long,) = lm.loglikelihood_rolling(reqs[:1], disable_tqdm=True)
    windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
        _ids(tok, texts[0]), lm.prefix_token_id, max_seq_len=16, context_len=1)]
    assert len(windows) == 3 and got_long == pytest.approx(sum(_reference(model, params, windows)), abs=1e-4)
    # a context longer than max_length is cut on the left, like every lm-eval model
    lm.max_length, lm.batch_size = 8, 3
    ((ll, _),) = lm.score([(_ids(tok, "abcdefghij"), _ids(tok, "kl"))])
    assert ll == pytest.approx(_reference(model, params, [(_ids(tok, "defghij"), _ids(tok, "kl"))])[0], abs=1e-4)
