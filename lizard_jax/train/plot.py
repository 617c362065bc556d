"""Training curves from run_dir/metrics.jsonl (`train.loop`), one run or several on one figure.

    python -m lizard_jax.train.plot RUN_DIR [--out PNG]
    python -m lizard_jax.train.plot --runs beta0=runs/a beta1=runs/b [--out compare.png]

Panels (those with data): the loss of stage 1 (attention transfer, log scale) and stage 2 (fine-tuning); stage 1's
per-layer attention-output MSE ("layer_mse"); a Lizard student's beta and alpha per layer over the steps (mean over
heads; stage 2 continues stage 1's step axis, a dotted line marks the boundary), and both at the last record
against the layer index. Per-layer curves: colour = layer (the colour bar), line style = run; whole-run curves
and the last-record panel: colour = run (there beta solid, alpha dashed). Written with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STYLES = ("-", "--", ":", "-.")


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is {run_dir} a train.py run_dir?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _layer_series(recs: list[dict], key: str) -> dict[int, list[tuple[int, float]]]:
    """{layer: [(step, value), ...]} from the records holding per-layer list `key` (None entries skipped)."""
    out: dict[int, list] = {}
    for r in recs:
        for i, v in enumerate(r.get(key) or ()):
            if v is not None:
                out.setdefault(i, []).append((r["step"], v))
    return out


def plot_runs(runs: dict[str, list[dict]], out, title: str | None = None) -> Path:
    """Draw `runs` ({label: metrics records}) into the PNG `out`; returns its path."""
    from matplotlib import cm, colors

    from lizard_jax.figures import pyplot, save_figure

    plt = pyplot()

    has = lambda key: any(key in r for recs in runs.values() for r in recs)
    stages = {r["stage"] for recs in runs.values() for r in recs}
    panels = [(f"loss{i}", name) for i, name in ((1, "stage 1: attention transfer loss"),
                                                 (2, "stage 2: fine-tuning loss")) if i in stages or not stages]
    if has("layer_mse"):
        panels.append(("layer_mse", "stage 1: attention-output MSE per layer"))
    if has("beta"):
        panels += [("beta", "beta (gated branch weight) per layer"), ("alpha", "alpha (anchor weight) per layer"),
                   ("final", "beta, alpha at the last record")]
    ncol = min(len(panels), 3)
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.8 * nrow), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    n_layers = max((len(r[k]) for recs in runs.values() for r in recs for k in ("layer_mse", "beta") if k in r),
                   default=1)
    norm = colors.Normalize(0, max(n_layers - 1, 1))
    cmap = plt.get_cmap("viridis")
    run_color = {label: f"C{j % 10}" for j, label in enumerate(runs)}
    run_style = {label: STYLES[j % len(STYLES)] for j, label in enumerate(runs)}
    boundary = {label: max((r["step"] for r in recs if r["stage"] == 1), default=None)  # when a stage 2 follows
                if any(r["stage"] == 2 for r in recs) else None for label, recs in runs.items()}

    for ax, (key, name) in zip(axes.flat, panels):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("layer" if key == "final" else "step")
        if key in ("loss1", "loss2"):
            stage = int(key[-1])
            for label, recs in runs.items():
                pts = [(r["step"], r["loss"]) for r in recs if r["stage"] == stage]
                if pts:
                    ax.plot(*zip(*pts), color=run_color[label], label=label)
            if stage == 1 and ax.lines:
                ax.set_yscale("log")
            if len(runs) > 1 and ax.lines:
                ax.legend(fontsize=8)
        elif key in ("layer_mse", "beta", "alpha"):
            for label, recs in runs.items():
                for i, pts in sorted(_layer_series(recs, key).items()):
                    ax.plot(*zip(*pts), color=cmap(norm(i)), ls=run_style[label], lw=1)
                if key != "layer_mse" and boundary[label] is not None:
                    ax.axvline(boundary[label], color="grey", ls=":", lw=0.8)
            if key == "layer_mse":
                ax.set_yscale("log")
            fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="layer")
            if len(runs) > 1:
                ax.legend([plt.Line2D([], [], color="k", ls=run_style[l]) for l in runs], list(runs), fontsize=8)
        else:  # final beta / alpha against the layer
            for label, recs in runs.items():
                last = next((r for r in reversed(recs) if "beta" in r), None)
                if last is None:
                    continue
                for k, marker, ls in (("beta", "o", "-"), ("alpha", "s", "--")):
                    pts = [(i, v) for i, v in enumerate(last[k]) if v is not None]
                    ax.plot(*zip(*pts), marker=marker, ms=3, color=run_color[label], ls=ls,
                            label=f"{label + ' ' if len(runs) > 1 else ''}{k} (step {last['step']})")
            ax.axhline(0, color="grey", lw=0.5)
            ax.legend(fontsize=7)
    return save_figure(fig, out, title=title, dpi=100)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lizard_jax.train.plot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="*", help="run dirs (labelled by their folder name)")
    ap.add_argument("--runs", nargs="+", default=[], metavar="LABEL=DIR", help="labelled run dirs to compare")
    ap.add_argument("--out", help="PNG to write (default: RUN_DIR/curves.png for one run, else compare.png)")
    ap.add_argument("--title")
    a = ap.parse_args(argv)
    runs: dict[str, Path] = {Path(d).name or str(d): Path(d) for d in a.run_dirs}
    for item in a.runs:
        label, sep, d = item.partition("=")
        if not sep or not label or not d:
            ap.error(f"--runs takes LABEL=DIR, got {item!r}")
        runs[label] = Path(d)
    if not runs:
        ap.error("give at least one run dir")
    try:
        recs = {label: read_metrics(d) for label, d in runs.items()}
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = a.out or (next(iter(runs.values())) / "curves.png" if len(runs) == 1 else "compare.png")
    print(plot_runs(recs, out, a.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
