"""Teacher vs linearized student, side by side in one run: eval.py perplexity, passkey, mqar and speed for both,
plus the student's training throughput read from its metrics.jsonl. Prints one table and appends it, with the
exact eval.py commands, to benchmarks/RESULTS.md.

    python -m benchmarks.bench_lizard --teacher DIR --student DIR [--text data/wikitext-2/valid.txt.xz] \
        [--metrics RUN/metrics.jsonl] [--tasks perplexity,passkey,mqar,speed] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.common import WIKITEXT, report

ROOT = Path(__file__).resolve().parents[1]


def run_eval(args: list[str], log: Path | None) -> dict:
    cmd = [sys.executable, str(ROOT / "eval.py"), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if log is not None:
        with log.open("a") as f:
            f.write(f"$ {' '.join(cmd)}\n{p.stdout}\n{p.stderr[-3000:]}\n")
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--text", default=str(WIKITEXT), help="evaluation text: perplexity, passkey filler")
    ap.add_argument("--metrics", default=None, help="the student's training metrics.jsonl")
    ap.add_argument("--tasks", default="perplexity,passkey,mqar,speed")
    ap.add_argument("--passkey-lengths", default="1024,2048,4096")
    ap.add_argument("--contexts", default="4096,16384,32768")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=None, help="folder for logs, JSON and the speed plot")
    a = ap.parse_args(argv)
    out = Path(a.out) if a.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    log = out / "bench_lizard.log" if out else None
    tasks = a.tasks.split(",")
    models = {"teacher": a.teacher, "student": a.student}
    res: dict[str, dict] = {m: {} for m in models}
    commands = []
    for name, ck in models.items():
        common = ["--checkpoint", ck, "--dtype", a.dtype]
        jobs = {
            "perplexity": ["perplexity", *common, "--text", a.text, "--seq-len", "1024", "--batch-size", "16"],
            "passkey": ["passkey", *common, "--text", a.text, "--lengths", a.passkey_lengths],
            "mqar": ["mqar", *common, "--pairs", "8,32,64", "--trials", "8"],
        }
        for task in tasks:
            if task in jobs:
                commands.append("python eval.py " + " ".join(jobs[task]))
                res[name][task] = run_eval(jobs[task], log)
    speed = {}
    if "speed" in tasks:
        args = ["speed", "--checkpoint", f"teacher={a.teacher}", "--checkpoint", f"student={a.student}",
                "--dtype", a.dtype, "--contexts", a.contexts, "--decode-tokens", "64", "--reps", "3"]
        if out:
            args += ["--plot", str(out / "speed.png")]
        commands.append("python eval.py " + " ".join(args))
        speed = run_eval(args, log)
    if out:
        (out / "bench_lizard.json").write_text(json.dumps({"results": res, "speed": speed}, indent=2))

    rows = []
    for name in models:
        r = res[name]
        rows.append([
            name,
            r.get("perplexity", {}).get("perplexity", r.get("perplexity", {}).get("error", "")),
            json.dumps(r.get("passkey", {}).get("by_length", r.get("passkey", {}).get("error", ""))),
            json.dumps(r.get("mqar", {}).get("by_pairs", r.get("mqar", {}).get("error", ""))),
        ])
    headers = ["model", "wikitext-2 ppl (seq 1024)", "passkey acc by length", "mqar acc by pairs"]
    notes = ["commands: " + " ; ".join(f"`{c}`" for c in commands)]
    if a.metrics and Path(a.metrics).is_file():
        recs = [json.loads(l) for l in Path(a.metrics).read_text().splitlines() if l]
        for stage in (1, 2):
            rs = [r for r in recs if r["stage"] == stage][1:]  # the first record includes compilation
            if rs:
                tps = statistics.median(r["tokens_per_s"] for r in rs)
                mfu = statistics.median(r.get("mfu", float("nan")) for r in rs)
                notes.append(f"training stage {stage}: {tps:,.0f} tokens/s, MFU {100 * mfu:.1f}% (model FLOPs, "
                             f"989 TFLOP/s peak), final loss {rs[-1]['loss']:.4f} at step {rs[-1]['step']}")
    report("Lizard student vs teacher (quality)", headers, rows, notes="; ".join(notes))
    if speed and "models" in speed:
        srows = []
        for m in speed["models"].values():
            for r in m["rows"]:
                srows.append([m["label"], r.get("context"), r.get("prefill_ms"), r.get("decode_tok_s"),
                              r.get("cache_bytes"), r.get("peak_bytes"), r.get("status", "ok")])
        report("Lizard student vs teacher (speed)", ["model", "context", "prefill ms", "decode tok/s",
                                                      "cache bytes", "peak bytes", "status"], srows,
               notes=f"`{commands[-1]}`")
    elif speed:
        print("speed:", speed)


if __name__ == "__main__":
    main()
