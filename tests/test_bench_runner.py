"""benchmarks/run.py end to end on the CPU (--tiny: tiny shapes, kernels in interpret mode): the plan, a budget
that starts nothing, a run killed mid-step and finished by --resume without re-running its finished rows, and
the report appended to a temporary RESULTS file (never the real benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import run as runner

ROOT = Path(__file__).resolve().parents[1]


def test_plan_production(capsys, tmp_path):
    ceil = tmp_path / "ceil.json"
    ceil.write_text(json.dumps({"matmul_tflops": 100.0, "copy_gbs": 1000.0}))
    assert runner.main(["--plan", "--ceilings-json", str(ceil)]) == 0
    out = capsys.readouterr().out
    assert "order of measurement" in out
    positions = [out.index(f". {s.name} ") for s in runner.STEPS]
    assert positions == sorted(positions), "steps are printed in their order of importance"
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in out.splitlines() if line.startswith("| gla/") or line.startswith("| sparse/")}
    for v in runner.gla_variants():
        for gate in runner.GATES:
            for p in runner.PASSES:
                assert (f"gla/{v}/{gate}/T4096/{p}" in table) != (v in runner.GLA_TILES and p == "fwd")
    for d in runner.sparse_designs():
        assert f"sparse/{d}/T32768/1of8/fwd+bwd" in table
    assert "gla/fla/per-head/T16384/fwd+bwd" in table and "sparse/cudnn/T65536/fwd" in table
    # the roofline is against the given ceilings: the larger of FLOPs / 100 TFLOP/s and bytes / 1000 GB/s
    for rid in ("gla/fla/per-dim/T4096/fwd", "sparse/cudnn/T32768/fwd+bwd", "sparse/v1/T8192/1of16/fwd"):
        mb, gflop, _, ms, bound, _ = table[rid]
        t_m, t_c = float(mb) * 1e6 / 1e12 * 1e3, float(gflop) * 1e9 / 100e12 * 1e3
        assert float(ms) == pytest.approx(max(t_m, t_c), rel=0.01)
        assert bound == ("memory" if t_m > t_c else "compute")


def test_budget_starts_nothing(tmp_path, capsys):
    out, md = tmp_path / "r.json", tmp_path / "RESULTS.md"
    assert runner.main(["--tiny", "--budget-s", "1", "--out", str(out), "--results-md", str(md)]) == 0
    data = json.loads(out.read_text())
    assert data["rows"] == {}
    assert {k: v["status"] for k, v in data["steps"].items()} == {s.name: "budget" for s in runner.STEPS}
    assert "not started" in capsys.readouterr().out
    assert "--budget-s 1" in md.read_text()


def _rows(path: Path) -> dict:
    try:
        return json.loads(path.read_text())["rows"]
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_killed_then_resumed(tmp_path):
    """Killed after the first kernel row; --resume runs only the rest, then the report lands in a temp file."""
    out, md = tmp_path / "r.json", tmp_path / "RESULTS.md"
    args = [sys.executable, "-m", "benchmarks.run", "--tiny", "--only", "ceilings,gla,sparse-cudnn",
            "--out", str(out), "--results-md", str(md)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.Popen(args, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any(k.startswith("gla/") for k in _rows(out)):
            assert p.poll() is None, "the runner ended before its first GLA row"
            assert time.monotonic() < deadline, "no GLA row after 120 s"
            time.sleep(0.2)
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the runner and its step subprocess
        p.wait()
    before = _rows(out)
    n_gla = len([r for r in runner.STEP_BY_NAME["gla"].rows(runner.TINY)])
    assert before["ceilings"]["status"] == "ok" and 1 <= len([k for k in before if k.startswith("gla/")]) < n_gla
    assert not md.exists(), "a killed run writes no report"

    done = subprocess.run(args + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    after = _rows(out)
    for rid, row in before.items():  # finished rows were not measured again
        assert after[rid] == row, rid
    wanted = [r["id"] for s in ("ceilings", "gla", "sparse-cudnn") for r in runner.STEP_BY_NAME[s].rows(runner.TINY)]
    assert sorted(after) == sorted(wanted)
    assert all(after[r]["status"] == "ok" for r in wanted if not r.startswith("sparse/cudnn"))
    assert all(after[r]["status"] == "skipped" and "GPU" in after[r]["note"] for r in wanted
               if r.startswith("sparse/cudnn"))
    for rid in wanted:
        if rid.startswith("gla/"):  # timed rows carry the prediction
            assert after[rid]["ms"] > 0 and after[rid]["predicted_ms"] > 0 and after[rid]["measured/predicted"] > 0
    text = md.read_text()
    assert text.count("## Benchmark runner") == 1
    assert "--resume" in text and "jax " in text and "cpu" in text
    assert all(f"| {rid} |" in text for rid in wanted)
