"""Run a named list of evaluation commands (the accuracy tables of issues #16 and #17) and keep every result.

    python -m benchmarks.sweep PLAN[,PLAN...] --teacher CKPT --out results.jsonl [--jobs 3] [--budget-s 400]
        [--deadline-s 540]
    python -m benchmarks.sweep --list
    python -m benchmarks.sweep --report TITLE --out results.jsonl [--only a,b] [--notes ...]   # RESULTS.md table

Each item is one command (`eval.py`, a benchmark script, `train.py`, `lizard_jax.sala`) run as its own process;
its last stdout line (the JSON eval.py, train.py and sala print) is appended to --out as
`{"plan", "label", "command", "seconds", "rc", "result"}` (a benchmark script's tables: "stdout_tail"). Items already in --out with rc 0 are skipped, so a
sweep cut by a time limit resumes where it stopped; --deadline-s kills what still runs then (rc 124). `--jobs N` runs N items at once: accuracy does not depend on
it (each process gets 1/N of the GPU memory), timing rows are never measured here. An item that would start
after --budget-s is left for the next run. `{teacher}`, `{text}` (the shipped WikiText-2 valid), `{train_text}`
(the shipped training text) and `{work}` (a scratch folder beside --out) are filled in.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# InfLLM-V2 at 8K with sparse attention active: dense below 1024 keys, a 512-token local window (8 blocks) plus
# top-k blocks; 24 + 8 = 32 of the 128 key blocks at the last query is 1/4, 8 + 8 = 16 is 1/8.
_SPARSE = {"q4": ["dense_below=1024", "local_window=512", "topk=24"],
           "q8": ["dense_below=1024", "local_window=512", "topk=8"]}


def _sparse(frac: str, selection: str) -> list[str]:
    opts = _SPARSE[frac] + [f"selection={selection}"]
    return ["--sparse-prefill"] + [a for o in opts for a in ("--sparse-option", o)]


def _plans() -> dict[str, list[tuple[str, list[str]]]]:
    ev = [PY, "eval.py"]
    # perplexity at seq 8192 on the first PPL_TOKENS of WikiText-2 valid (the same windows in every row)
    ppl8k = ev + ["perplexity", "--checkpoint", "{teacher}", "--text", "{text}", "--seq-len", "8192",
                  "--batch-size", "1", "--max-tokens", str(PPL_TOKENS)]
    pk8k = ev + ["passkey", "--checkpoint", "{teacher}", "--text", "{text}", "--lengths", "8192", "--trials", "2"]
    dense = [("ppl8k-dense", ppl8k), ("passkey8k-dense", pk8k)]
    sparse = []
    for frac in ("q4", "q8"):
        for sel in ("token", "block"):
            sparse += [(f"ppl8k-{sel}-{frac}", ppl8k + _sparse(frac, sel)),
                       (f"passkey8k-{sel}-{frac}", pk8k + _sparse(frac, sel))]
        # "block" runs the Pallas kernel where impl auto picks it (a GPU): the same selection on XLA beside it
        sparse.append((f"ppl8k-block-{frac}-xla", ppl8k + _sparse(frac, "block") + ["--sparse-option", "impl=xla"]))
    # Star on simulated devices (eval.py sets them up on a CPU); on one GPU, `--devices 1 --block-size B` runs
    # the same blocks on one device (the same arithmetic)
    star, star_ppl = [], []
    for label, flags in (("star4", ["--devices", "4"]), ("star8", ["--devices", "8"]),
                         ("star8-noanchor", ["--devices", "8", "--anchor", "none"])):
        cp = ["--context-parallel", "star"] + flags
        star.append((f"passkey8k-{label}", pk8k + cp))
        star_ppl.append((f"ppl8k-{label}", ppl8k + cp))
    star.append(("passkey8k-ring4", pk8k + ["--context-parallel", "ring", "--devices", "4"]))  # exact: == global
    # issue #17 item 2: the three schedules in one run (one full baseline), accuracy only (timing: alone)
    lazy = [("lazy-accuracy", [PY, "benchmarks/bench_lazyllm.py", "--checkpoint", "{teacher}", "--parts", "accuracy",
                               "--models", "smollm2", "--passkey-lengths", "4096,8192", "--ppl-contexts",
                               "2048,4096", "--trials", "2", "--windows", "4", "--decode", "attend_all",
                               "--schedules", ";".join(f"{k}={v}" for k, v in LAZY_SCHEDULES.items())]),
            # where the model reads the passkey: which layers a pruning may follow without losing it
            ("lazy-ranks", [PY, "benchmarks/bench_lazyllm.py", "--checkpoint", "{teacher}", "--parts", "ranks",
                            "--passkey-lengths", "4096,8192", "--trials", "2"])]
    return {"lazyllm": lazy, "dense": dense, "sparse-teacher": sparse, "star": star, "star-ppl": star_ppl,
            "lizard-gates": _lizard_gates(ev), "sala-select": _sala_select()}


# Lizard stage 1 only (issue #16 items 5-6): the shipped SmolLM2 recipe cut to 300 stage-1 steps, from beta 0 (our
# default), beta 1 (the paper's sum) and beta 0 with the mixing scalars at 10x the learning rate; steps 0 is the
# untrained student. Each student is then scored: perplexity, passkey beyond its 128-token window, MQAR.
# Memory: stage 2 in scope "lora" (s2-lora) ran out at --jobs 3 on an 80 GB H100 (a 23 GiB buffer); --jobs 2 there.
LIZARD_RUNS = {"untrained": ["stage1.steps=0"],
               "beta0": ["stage1.steps=300", "student.attention.default.gate_scale_init=0.0"],
               "beta1": ["stage1.steps=300", "student.attention.default.gate_scale_init=1.0"],
               "beta0-mix10": ["stage1.steps=300", "student.attention.default.gate_scale_init=0.0",
                               "stage1.mix_lr_mult=10.0"],
               # item 7: stage 2 (300 steps after the same 300 of stage 1), our wider scope vs the paper's (the config's)
               "s2-lora": ["stage1.steps=300", "stage2.steps=300", "stage2.train=lora"],
               "s2-loraonly": ["stage1.steps=300", "stage2.steps=300", "stage2.train=lora_only"]}


def _lizard_gates(ev: list[str]) -> list[tuple]:
    items, scored = [], [("teacher", ["--checkpoint", "{teacher}"])]
    for name, sets in LIZARD_RUNS.items():
        run = f"{{work}}/lizard_{name}"
        sets = (["stage2.steps=0"] + sets if not any(x.startswith("stage2.steps") for x in sets) else sets) + [
            "teacher={teacher}", f"run_dir={run}", f"export={run}/student"]
        items.append((f"train-{name}", [PY, "train.py", "--config", "configs/lizard_smollm2.yaml"]
                      + [a for kv in sets for a in ("--set", kv)]))
        scored.append((name, ["--checkpoint", f"{run}/student"], f"train-{name}"))  # export: a full checkpoint
    for name, ck, *after in scored:
        for task, args in (("ppl1k", ["perplexity", "--text", "{text}", "--seq-len", "1024", "--batch-size", "8"]),
                           ("passkey", ["passkey", "--text", "{text}", "--lengths", "512,1024,2048", "--trials", "2"]),
                           ("mqar", ["mqar", "--pairs", "8,32,64", "--trials", "20"])):
            items.append((f"{task}-{name}", ev + args[:1] + ck + args[1:], *after))
    return items


def _sala_select() -> list[tuple]:
    """Issue #16 item 4: the layer ranking twice (seeds 0 and 1), 600 transfer steps of 8 x 512 tokens, scored on
    64K held-out tokens; `python -m lizard_jax.sala compare` gives the rank correlation."""
    return [(f"select-seed{seed}", [PY, "-m", "lizard_jax.sala", "select", "--teacher", "{teacher}",
                                     "--recipe", "configs/sala_smollm2.yaml", "--text", "{train_text}",
                                     "--steps", "600", "--seq-len", "512", "--batch-size", "8", "--seed", str(seed),
                                     "--eval-tokens", "65536", "--out", f"{{work}}/select_seed{seed}.json"])
            for seed in (0, 1)]


PPL_TOKENS = 4 * 8192  # four windows of 8192 tokens (8191 scored each)
# "early" was LazyConfig.default until this table (issue #17) made the default "20:0.1" (late1 here)
LAZY_SCHEDULES = {"gentle": "15,22:0.8,0.6", "early": "4,12,21:0.5,0.25,0.15", "aggressive": "2,8,15:0.4,0.2,0.1",
                  "late": "20,24:0.3,0.15", "late1": "20:0.1"}


def _fill(cmd: list[str], values: dict[str, str]) -> list[str]:
    def fill(c: str) -> str:  # only the named fields: a literal brace in a command stays as it is
        for k, v in values.items():
            c = c.replace("{" + k + "}", v)
        return c

    return [fill(c) for c in cmd]


def _done(out: Path) -> set[tuple[str, str]]:
    if not out.is_file():
        return set()
    done = set()
    for line in out.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if r.get("rc") == 0:
                done.add((r["plan"], r["label"]))
    return done


def run_item(plan: str, label: str, cmd: list[str], out: Path, env: dict, log, timeout: float | None = None) -> dict:
    Path(env["SWEEP_WORK"]).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # killed at the deadline: recorded, rerun by the next sweep
        text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        p = subprocess.CompletedProcess(cmd, 124, text(e.stdout), text(e.stderr) + "\n[sweep] killed at the deadline")
    seconds = round(time.perf_counter() - t0, 1)
    lines = [l for l in p.stdout.splitlines() if l.strip()]
    try:
        result = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        result = None
    rec = {"plan": plan, "label": label, "command": shlex.join(cmd), "seconds": seconds, "rc": p.returncode,
           "result": result}
    if result is None:  # a benchmark script prints tables, not JSON
        rec["stdout_tail"] = p.stdout[-8000:]
    if p.returncode:
        rec["stderr_tail"] = p.stderr[-3000:]
    with out.open("a") as f:  # one short line per item: appends from the worker threads do not interleave
        f.write(json.dumps(rec) + "\n")
    log(f"[sweep] {plan}/{label}: rc {rec['rc']} in {seconds} s")
    return rec


def summary(result: dict | None) -> str:
    """The headline numbers of one eval.py result: perplexity (tokens), or accuracy with its per-length /
    per-pairs split and the passkey answers' count."""
    if not result:
        return "-"
    if "perplexity" in result:
        return f"ppl {result['perplexity']:.3f} ({result.get('tokens', '?')} tokens)"
    if "accuracy" in result:
        trials = result.get("trials") or []
        hits = sum(bool(t.get("correct")) for t in trials)
        split = result.get("by_length") or result.get("by_pairs") or {}
        parts = [f"{k}: {v:.2f}" for k, v in split.items()] if len(split) > 1 else []
        count = f" ({hits}/{len(trials)})" if trials else ""
        return f"accuracy {result['accuracy']:.2f}{count}" + (f" [{', '.join(parts)}]" if parts else "")
    return json.dumps(result)[:200]


def report(out: Path, title: str, labels: list[str] | None, notes: str, results_md: str | None) -> str:
    """Append the results of `out` (the last record of each label; `labels` picks and orders them) to
    RESULTS.md as one table, the command of every row beside it."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import report as write

    recs = {}
    for line in out.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            recs[r["label"]] = r
    labels = labels or list(recs)
    missing = [l for l in labels if l not in recs]
    if missing:
        raise SystemExit(f"no result for {missing} in {out}")
    rows = [[l, summary(recs[l]["result"]) if recs[l]["rc"] == 0 else f"failed (rc {recs[l]['rc']})",
             recs[l]["seconds"], "`" + recs[l]["command"].replace(sys.executable, "python").replace(str(ROOT) + "/", "")
             + "`"] for l in labels]
    return write(title, ["item", "result", "seconds", "command"], rows, notes, path=results_md)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plans", nargs="?", default="", help="comma-separated plan names (--list shows them)")
    ap.add_argument("--teacher", help="converted teacher checkpoint folder")
    ap.add_argument("--out", help="results (JSON lines; resumed)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=None, help="start no item after this many seconds")
    ap.add_argument("--deadline-s", type=float, default=None, help="kill any item still running at this time")
    ap.add_argument("--only", default="", help="comma-separated item labels (default: all of the plans)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--report", metavar="TITLE", help="append --out's results (--only: which, in order) to RESULTS.md")
    ap.add_argument("--notes", default="", help="notes line of the --report table")
    ap.add_argument("--results-md", default=None, help="the file --report appends to (default benchmarks/RESULTS.md)")
    a = ap.parse_args(argv)
    if a.report:
        report(Path(a.out), a.report, [l for l in a.only.split(",") if l] or None, a.notes, a.results_md)
        return 0
    plans = _plans()
    if a.list:
        for name, items in plans.items():
            print(name)
            for label, cmd, *after in items:
                print(f"  {label}: {shlex.join(cmd)}" + (f"  (after {after[0]})" if after else ""))
        return 0
    names = [p for p in a.plans.split(",") if p]
    unknown = [p for p in names if p not in plans]
    if not names or unknown or not a.teacher or not a.out:
        ap.error(f"give known plans ({', '.join(plans)}), --teacher and --out; unknown: {unknown}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    values = {"teacher": a.teacher, "text": str(ROOT / "data/wikitext-2/valid.txt.xz"),
              "train_text": str(ROOT / "data/brown/brown.txt.xz"), "work": str(out.parent / "work")}
    only = {l for l in a.only.split(",") if l}
    done = _done(out)
    todo = [(p, label, _fill(cmd, values), after[0] if after else None) for p in names
            for label, cmd, *after in plans[p] if (p, label) not in done and (not only or label in only)]
    finished = {label: threading.Event() for _, label, _, _ in todo}
    ok = {label for _, label in done}
    env = dict(os.environ, SWEEP_WORK=values["work"])
    if a.jobs > 1:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / a.jobs:.2f}")
    start = time.perf_counter()
    log = lambda m: print(m, file=sys.stderr, flush=True)
    log(f"[sweep] {len(todo)} item(s) to run, {len(done)} done before")

    def go(item):
        plan, label, cmd, after = item
        try:
            if after in finished:  # its dependency was queued earlier, so it is running or done: no deadlock
                finished[after].wait()
            if after is not None and after not in ok:
                log(f"[sweep] {plan}/{label}: skipped, it needs {after}, which has not succeeded")
                return None
            if a.budget_s is not None and time.perf_counter() - start > a.budget_s:
                log(f"[sweep] {plan}/{label}: left for the next run (budget)")
                return None
            left = None if a.deadline_s is None else a.deadline_s - (time.perf_counter() - start)
            rec = run_item(plan, label, cmd, out, env, log, timeout=left)
            if rec["rc"] == 0:
                ok.add(label)
            return rec
        finally:
            finished[label].set()

    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as ex:
        recs = [r for r in ex.map(go, todo) if r is not None]
    failed = [r["label"] for r in recs if r["rc"]]
    print(json.dumps({"ran": len(recs), "failed": failed, "out": str(out)}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
