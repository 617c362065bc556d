"""benchmarks/sweep.py: items run as processes, results kept and resumed, dependencies, deadline, report."""

import json
import sys

import pytest

from benchmarks import sweep


def fake_plans(tmp_path):
    ok = lambda **r: [sys.executable, "-c", f"import json; print('log'); print(json.dumps({r!r}))"]
    return {"p": [("a", ok(perplexity=12.5, tokens=100)),
                  ("b", [sys.executable, "-c", "import sys; sys.exit(3)"]),
                  ("c", ok(accuracy=0.5, trials=[{"correct": True}, {"correct": False}]), "a"),
                  ("d", ok(accuracy=1.0), "b"),
                  ("slow", [sys.executable, "-c", "import time; time.sleep(30)"])]}


def records(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_sweep_runs_resumes_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "_plans", lambda: fake_plans(tmp_path))
    out = tmp_path / "r.jsonl"
    args = ["p", "--teacher", "T", "--out", str(out), "--jobs", "2", "--deadline-s", "4"]
    assert sweep.main(args) == 1  # b failed, slow was killed at the deadline
    got = {r["label"]: r for r in records(out)}
    assert got["a"]["rc"] == 0 and got["a"]["result"] == {"perplexity": 12.5, "tokens": 100}
    assert got["b"]["rc"] == 3 and got["slow"]["rc"] == 124
    assert got["c"]["rc"] == 0 and "d" not in got  # d needs b, which failed
    n = len(records(out))
    monkeypatch.setattr(sweep, "_plans", lambda: {"p": [x for x in fake_plans(tmp_path)["p"] if x[0] != "slow"]})
    sweep.main(args[:-2])  # resumed: a and c are not run again; b runs (and fails) again
    again = records(out)[n:]
    assert [r["label"] for r in again] == ["b"]
    capsys.readouterr()
    md = tmp_path / "R.md"
    sweep.main(["--report", "T", "--out", str(out), "--only", "c,a", "--results-md", str(md)])
    text = md.read_text()
    assert text.index("| c | accuracy 0.50 (1/2)") < text.index("| a | ppl 12.500 (100 tokens)")
    with pytest.raises(SystemExit, match="no result"):
        sweep.main(["--report", "T", "--out", str(out), "--only", "zz", "--results-md", str(md)])


def test_lizard_gates_scores_exported_students_alone():
    """train.py's `export` writes a full checkpoint, which eval.py refuses beside --teacher (an adapter's flag)."""
    items = sweep._plans()["lizard-gates"]
    scored = [cmd for label, cmd, *after in items if cmd[1] == "eval.py" and after]
    assert len(scored) == 3 * len(sweep.LIZARD_RUNS)
    for cmd in scored:
        assert cmd[cmd.index("--checkpoint") + 1].endswith("/student") and "--teacher" not in cmd
