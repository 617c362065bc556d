"""lm-evaluation-harness model "lizard_jax": any lizard_jax checkpoint, or student adapter + teacher, in any task.

    python -m lizard_jax.lm_eval --model lizard_jax --model_args checkpoint=DIR[,teacher=DIR][,dtype=bfloat16] \\
        --tasks hellaswag [--batch_size 16] [...any other lm_eval option]

lm-eval 0.4 finds a model only in its own registry, which a module fills when it is imported
(`lm_eval.api.registry.register_model`); it reads no entry points or plugins. So the plain `lm_eval` command does
not know "lizard_jax": `python -m lizard_jax.lm_eval` imports this module (registering the model) and then runs
lm_eval's own command line with the same arguments. From Python, `import lizard_jax.lm_eval` and then
`lm_eval.simple_evaluate(model="lizard_jax", model_args="checkpoint=DIR", ...)` (or pass a `LizardLM`).

model_args: checkpoint, teacher (for an adapter), dtype (compute dtype), max_length (context, default the
config's max_seq_len), max_gen_toks (default 256), seed (sampling). `--batch_size N` sets the batch ("auto": 8).
Scoring uses the library's forward (`eval.perplexity.token_logprobs`), generation `lizard_jax.generate` (greedy
unless a task asks for do_sample); stop strings are cut after generation.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lizard_jax.checkpoint import CheckpointError, read_format
from lizard_jax.cli import InputError, command

try:
    import lm_eval.models  # noqa: F401  (fills the registry with lm_eval's own models before ours is added)
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - the optional extra
    raise ImportError(f"the lm-evaluation-harness model needs lm-eval: pip install -e '.[eval]' ({e})") from None

log = logging.getLogger(__name__)
DEFAULT_BATCH = 8


def _bucket(n: int) -> int:
    """Padded sequence width: the next power of two, at least 64 (few shapes, so few compilations)."""
    return max(64, 1 << (n - 1).bit_length())


@register_model("lizard_jax")
class LizardLM(TemplateLM):
    """A lizard_jax model for lm-eval: loglikelihood, loglikelihood_rolling and generate_until, batched."""

    def __init__(self, checkpoint: str, teacher: str | None = None, dtype: str | None = None,
                 batch_size: int | str = DEFAULT_BATCH, max_length: int | None = None, max_gen_toks: int = 256,
                 seed: int = 0, device: str | None = None, max_batch_size: int | None = None):
        import lizard_jax

        super().__init__()
        del device, max_batch_size  # lm_eval passes them to every model; JAX places the parameters itself
        self.checkpoint = str(checkpoint)
        self.model, self.params, self.tokenizer = lizard_jax.load(checkpoint, teacher=teacher, dtype=dtype)
        if self.tokenizer is None:
            raise CheckpointError(f"{checkpoint} has no tokenizer/ folder: lm-eval tasks are text")
        if str(batch_size).startswith("auto"):
            log.warning("batch_size %s: lizard_jax uses a fixed batch, %d", batch_size, DEFAULT_BATCH)
            batch_size = DEFAULT_BATCH
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or self.model.cfg.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        if self.batch_size < 1 or self.max_length < 2 or self.max_gen_toks < 1:
            raise InputError(f"need batch_size >= 1, max_length >= 2, max_gen_toks >= 1; got "
                             f"{self.batch_size}, {self.max_length}, {self.max_gen_toks}")

    # ---- tokens
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else self.model.cfg.eos_token_ids[0])

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    @property
    def tokenizer_name(self) -> str:
        return self.checkpoint.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # ---- scoring
    def score(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool = True):
        """[(context ids, continuation ids)] -> [(sum log p(continuation | context), greedy)]; the context is
        cut on the left to fit max_length. Batches of similar length, right-padded to a power-of-two width."""
        from lizard_jax.eval.perplexity import token_logprobs

        seqs = [(c + x)[-(self.max_length + 1):] for c, x in pairs]
        n_cont = [len(x) for _, x in pairs]
        if any(n == 0 or n >= len(s) for n, s in zip(n_cont, seqs)):
            raise ValueError("every continuation needs >= 1 token and a context of >= 1 token before it")
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out: list = [None] * len(seqs)
        pad = self.model.cfg.pad_token_id
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="lizard_jax scoring"):
            idx = order[start: start + self.batch_size]
            width = min(_bucket(len(seqs[idx[0]])), self.max_length + 1)
            toks = np.full((self.batch_size, width), pad, np.int32)  # full batches: one program per width
            for r, i in enumerate(idx):
                toks[r, : len(seqs[i])] = seqs[i]
            logp, greedy = (np.asarray(a) for a in token_logprobs(self.model, self.params, toks))
            for r, i in enumerate(idx):
                end = len(seqs[i]) - 1  # logp[t] scores token t + 1
                sl = slice(end - n_cont[i], end)
                out[i] = (float(logp[r, sl].sum(dtype=np.float64)), bool(greedy[r, sl].all()))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        res = self.score([(ctx, cont) for _, ctx, cont in requests], disable_tqdm=disable_tqdm)
        for (key, _, _), r in zip(requests, res):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each string's full log-likelihood: lm-eval's disjoint rolling windows of max_length tokens, the first
        conditioned on the prefix token (BOS, else EOS)."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for w in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(w)
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self.score(windows, disable_tqdm=disable_tqdm)):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate for each (context, gen_kwargs): greedy (or sampled with do_sample / temperature / top_p) up to
        max_gen_toks tokens or EOS, then cut at the first `until` string. Requests with the same gen_kwargs run
        in batches of batch_size."""
        import lizard_jax

        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="lizard_jax generate_until")
        for key, idx in groups.items():
            kw = dict(json.loads(key))
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", kw.pop("max_new_tokens", self.max_gen_toks)))
            sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 1.0 if sample else 0.0)) if sample else 0.0
            top_p = float(kw.pop("top_p", 1.0) or 1.0)
            if kw:
                log.warning("lizard_jax ignores generation options %s", sorted(kw))
            keep = max(self.max_length - max_new, 1)
            idx = sorted(idx, key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(idx), self.batch_size):
                rows = idx[start: start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-keep:] or [self.prefix_token_id] for i in rows]
                prompts += [prompts[0]] * (self.batch_size - len(prompts))  # full batches: one program
                res = lizard_jax.generate(self.model, self.params, prompts, max_new_tokens=max_new,
                                          temperature=temperature, top_p=top_p, seed=self.seed + start)
                for i, toks in zip(rows, res.tokens):
                    text = self.tok_decode(toks)
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(rows))
        bar.close()
        return out


def _check_model_args(argv: list[str]) -> None:
    """A missing or broken checkpoint / teacher in --model_args fails now, not after lm-eval has indexed its tasks
    (~20 s)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model_args", default="")
    model_args = pre.parse_known_args(argv)[0].model_args or ""
    kv = dict(x.split("=", 1) for x in model_args.split(",") if "=" in x)
    for key in ("checkpoint", "teacher"):
        if key in kv:
            read_format(kv[key].strip())


@command
def main(argv: list[str] | None = None) -> int:
    """lm_eval's command line with the "lizard_jax" model registered (module doc)."""
    from lm_eval.__main__ import cli_evaluate

    argv = sys.argv[1:] if argv is None else argv
    _check_model_args(argv)
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
