"""Evaluate a lizard_jax checkpoint. Each task prints progress on stderr and, as the last line on stdout, one
JSON object with its results.

  python eval.py perplexity --checkpoint DIR --text FILE --seq-len 1024 [--max-tokens N]
      [--context-parallel star|ring [--devices N] [--block-size B] [--anchor first|none] [--anchor-size A]]
  python eval.py passkey --checkpoint DIR --text FILE --lengths 4096,8192 [--depths 0,0.25,0.5,0.75,1]
      [--context-parallel star|ring [--devices N] [--block-size B] [--anchor-size A] [--anchor first|none]
       [--query question|last]]
      [--prefill lazy [--lazy-layers 4,11 --lazy-keep 0.5,0.25 | --lazy-top-k 1024,512] [--lazy-sink N]
       [--lazy-recent N] [--lazy-pool K] [--lazy-decode attend_all|paper]]
  python eval.py mqar --checkpoint DIR [--pairs 8,32,128] [--lengths 1024,4096] [--queries 16] [--trials 10]
  python eval.py speed --checkpoint [LABEL=]DIR [--checkpoint ...] [--random [LABEL=]CONFIG.json]
      [--contexts 1024,2048,4096] [--decode-tokens 64] [--batch 1] [--dtype bfloat16] [--isolate] [--plot out.png]
      [--merge earlier_speed.json ...] [--sparse-prefill [LABEL=]DIR ...]

--sparse-prefill (training-free sparse prefill, `lizard_jax.sala.sparse_teacher`): the checkpoint's full softmax
layers run as InfLLM-V2 with the paper's settings (dense below 8192 keys), its parameters unchanged. A flag for
perplexity / passkey / mqar; for speed a further model source (label default: the folder name + "-sparse"), so
the teacher and its sparse prefill are measured side by side. `--sparse-option KEY=VALUE` (repeatable) overrides
a setting, e.g. dense_below=4096 or topk=32.

perplexity --context-parallel scores each window through the context-parallel prefill
(`lizard_jax.distributed.score_context_parallel`): the window is cut into blocks of --block-size (default: seq-len /
devices; seq-len must be a multiple of block-size x devices, several blocks per device allowed); Star scores every
block but the last from its phase-1 logits (attention within [anchor, block]) and the last block as the phase-2
query over all blocks (the global view). Ring attention is exact: it gives the global perplexity.
E.g. Star with 4 blocks of 2048 at 8192 tokens on one GPU: --seq-len 8192 --context-parallel star --devices 1
--block-size 2048.

passkey generates through `lizard_jax.generate` and takes its options: `--context-parallel` splits each prompt over
a mesh whose "context" axis has `--devices` devices (Star Attention or ring attention, `lizard_jax.distributed`);
`--prefill lazy` prunes the prefill (LazyLLM, `lizard_jax.lazy`; without `--lazy-layers`, `LazyConfig.default`).
With context parallelism the prompt's question is the phase-2 query (`--query question`, Star Attention's setup;
`--query last`: the last 64 prompt tokens); `--lazy-decode paper` re-prunes at every decoding step (LazyLLM's
decoding; default attend_all, see `LazyConfig.decode`).
On a CPU, N simulated devices need XLA_FLAGS=--xla_force_host_platform_device_count=N before jax starts; eval.py
sets it itself for `--devices N` when jax is not yet imported (run as a program). Multi-host: start the same
`eval.py passkey ... --context-parallel star --multihost` once per host (e.g. `srun -N 4 python eval.py ...`);
each process first calls `jax.distributed.initialize()` (coordinator and process ids from the cluster
environment), the mesh spans every process's devices, and every process prints the same result. (Checked on one
machine with two CPU processes: a SLURM-like environment, JAX_COORDINATOR_ADDRESS and
JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo; tests/test_generate_options.py.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _error(message: str) -> Exception:
    """A bad flag or input: `lizard_jax.cli` prints it as one `error:` line and exits 2 (imported late: see
    `main`)."""
    from lizard_jax.cli import InputError

    return InputError(message)


def _sparse_option(s: str) -> tuple[str, int | str]:
    """KEY=VALUE of an InfLLM-V2 setting: an integer, or a name for the settings that take one (selection,
    variant, impl); the key and value themselves are checked by `sala.sparse_teacher` and `SparseSpec`."""
    key, sep, value = s.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    key, value = key.strip(), value.strip()
    if key in ("selection", "variant", "impl"):
        return key, value
    try:
        return key, int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{key}: expected an integer, got {value!r}") from None


def _add_sparse_option(p):
    p.add_argument("--sparse-option", type=_sparse_option, action="append", default=[], metavar="KEY=VALUE",
                   help="InfLLM-V2 setting of --sparse-prefill (block_size, topk, kernel, stride, init_blocks, "
                        "local_window, dense_below: integers; selection: token|block; variant: v1|v2; impl: auto|pallas|xla)")


def _add_common(p):
    p.add_argument("--checkpoint", required=True, help="lizard_jax checkpoint folder (or a student adapter)")
    p.add_argument("--teacher", default=None, help="the teacher checkpoint of a student adapter (lizard_jax.adapter)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="compute dtype override")
    p.add_argument("--sparse-prefill", action="store_true",
                   help="run the full softmax layers as InfLLM-V2 (training-free sparse prefill)")
    _add_sparse_option(p)


def _load(a, mesh=None):
    """(model, params, tokenizer) of --checkpoint (params placed on `mesh` if given), as the training-free sparse
    teacher with --sparse-prefill."""
    import lizard_jax
    from lizard_jax.models import Transformer
    from lizard_jax.sala import sparse_teacher

    if a.sparse_option and not a.sparse_prefill:
        raise _error("--sparse-option needs --sparse-prefill")
    model, params, tok = lizard_jax.load(a.checkpoint, mesh, dtype=a.dtype, teacher=a.teacher)
    if a.sparse_prefill:
        model = Transformer(sparse_teacher(model.cfg, **dict(a.sparse_option)))
    return model, params, tok


def _sparse_note(a, out: dict) -> dict:
    if a.sparse_prefill:
        from lizard_jax.sala import PAPER_INFLLM

        out["sparse_prefill"] = {**PAPER_INFLLM, **dict(a.sparse_option)}
    return out


def cmd_perplexity(a) -> dict:
    from lizard_jax.eval.perplexity import perplexity
    from lizard_jax.textio import read_text

    given = ["--" + n.replace("_", "-") for n in CP_FLAGS if getattr(a, n, None) is not None]
    if a.context_parallel is None and given:
        raise _error(f"{', '.join(given)} need(s) --context-parallel")
    if a.devices is not None and a.devices < 1:
        raise _error(f"--devices must be >= 1, got {a.devices}")
    mesh = _context_mesh(a)
    cp = None if mesh is None else dict(mode=a.context_parallel, block_size=a.block_size, anchor=a.anchor or "first",
                                        anchor_size=a.anchor_size)
    model, params, tok = _load(a, mesh)
    if tok is None:
        raise _error(f"{a.checkpoint} has no tokenizer/ folder; cannot tokenize {a.text}")
    text = read_text(a.text, "--text")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise _error(f"--text {a.text} is {len(ids)} token(s) long; perplexity scores from the second token on")
    out = perplexity(model, params, ids, seq_len=a.seq_len, max_tokens=a.max_tokens, batch_size=a.batch_size,
                     context_parallel=cp, mesh=mesh)
    out.update(checkpoint=str(a.checkpoint), text=str(a.text))
    return _sparse_note(a, out)


def _numbers(kind):
    """argparse type: a non-empty comma-separated list of `kind` (int or float)."""

    def parse(s: str) -> list:
        try:
            out = [kind(x) for x in s.split(",") if x.strip()]
        except ValueError:
            out = []
        if not out:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s like 1,2, got {s!r}")
        return out

    return parse


_floats, _ints = _numbers(float), _numbers(int)


CP_FLAGS = ("devices", "block_size", "anchor_size", "anchor", "query")
LAZY_FLAGS = ("lazy_layers", "lazy_keep", "lazy_top_k", "lazy_sink", "lazy_recent", "lazy_pool", "lazy_decode")


def _add_context_parallel(p, what: str = "prompt", context: str = "context"):
    """The context-parallel options (Star Attention / ring attention over a mesh's "context" axis)."""
    p.add_argument("--context-parallel", default=None, choices=["star", "ring"],
                   help=f"split each {what} over a device mesh: Star Attention or ring attention")
    p.add_argument("--devices", type=int, default=None,
                   help="devices on the mesh's context axis (default: all); on a CPU, simulated devices")
    p.add_argument("--block-size", type=int, default=None, help=f"context block size (default: {context} / devices)")
    p.add_argument("--anchor-size", type=int, default=None, help="Star anchor tokens (default: the block size)")
    p.add_argument("--anchor", default=None, choices=["first", "none"], help="Star anchor block (default: first)")


def _add_generation(p):
    """`lizard_jax.generate`'s context-parallel and lazy-prefill options."""
    _add_context_parallel(p)
    p.add_argument("--query", default=None, choices=["question", "last"],
                   help="the phase-2 query: the prompt's question (default, as in Star Attention) or its last 64 "
                        "tokens")
    p.add_argument("--multihost", action="store_true",
                   help="call jax.distributed.initialize() first (one process per host)")
    p.add_argument("--prefill", default="full", choices=["full", "lazy"], help="lazy: LazyLLM pruned prefill")
    p.add_argument("--lazy-layers", type=_ints, default=None, help="comma-separated pruning layers")
    p.add_argument("--lazy-keep", type=_floats, default=None, help="kept fraction of the prompt after each one")
    p.add_argument("--lazy-top-k", type=_ints, default=None, help="kept tokens after each pruning layer")
    p.add_argument("--lazy-sink", type=int, default=None, help="always keep the first N prompt tokens")
    p.add_argument("--lazy-recent", type=int, default=None, help="always keep the N tokens before the last one")
    p.add_argument("--lazy-pool", type=int, default=None, help="max-pool scores over K neighbours (odd)")
    p.add_argument("--lazy-decode", default=None, choices=["attend_all", "paper"],
                   help="decoding attends to every token with KV (attend_all, default) or re-prunes each step (paper)")


def _check_generation_flags(a) -> None:
    """Options of a mode that was not chosen are errors, not silently ignored."""
    given = lambda names: ["--" + n.replace("_", "-") for n in names if getattr(a, n) is not None]
    cp = given(CP_FLAGS) + (["--multihost"] if a.multihost else [])
    if a.context_parallel is None and cp:
        raise _error(f"{', '.join(cp)} need(s) --context-parallel")
    if a.prefill != "lazy" and given(LAZY_FLAGS):
        raise _error(f"{', '.join(given(LAZY_FLAGS))} need(s) --prefill lazy")
    if a.prefill == "lazy" and a.context_parallel is not None:
        raise _error("--prefill lazy cannot be combined with --context-parallel")
    if a.devices is not None and a.devices < 1:
        raise _error(f"--devices must be >= 1, got {a.devices}")


def _simulate_cpu_devices(n: int) -> None:
    """Ask XLA for `n` host (CPU) devices. Only possible before jax is imported (the flag is read when the CPU
    backend starts); it does not change GPU/TPU device counts."""
    flag = "--xla_force_host_platform_device_count"
    flags = os.environ.get("XLA_FLAGS", "")
    if "jax" not in sys.modules and flag not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {flag}={n}".strip()


def _context_mesh(a):
    """--context-parallel's mesh: a "context" axis over the first --devices devices of all processes (default:
    all of them); None without --context-parallel."""
    if a.context_parallel is None:
        return None
    import jax

    from lizard_jax.sharding import make_mesh

    n = a.devices or jax.device_count()
    if n > jax.device_count():
        raise _error(f"--devices {n} but jax sees {jax.device_count()} {jax.default_backend()} "
                         f"device(s); on a CPU set XLA_FLAGS=--xla_force_host_platform_device_count={n} "
                         f"before jax starts")
    return make_mesh({"context": n}, devices=jax.devices()[:n])


def _generation_options(a, model, mesh):
    """-> (`lizard_jax.generate` keyword arguments, their description for the result JSON)."""
    if mesh is not None:
        from lizard_jax.distributed import validate_context_parallel

        kw = dict(context_parallel=a.context_parallel, block_size=a.block_size, anchor_size=a.anchor_size,
                  anchor=a.anchor or "first")
        try:
            validate_context_parallel(mesh, model.cfg, mode=a.context_parallel, block_size=a.block_size,
                                      anchor_size=a.anchor_size, anchor=kw["anchor"])
        except ValueError as e:  # the validator's message names the option
            raise _error(str(e)) from None
        return kw | {"mesh": mesh}, kw | {"devices": mesh.shape["context"], "query": a.query or "question"}
    if a.prefill == "lazy":
        from lizard_jax.lazy import LazyConfig

        extra = {k: v for k, v in (("sink_tokens", a.lazy_sink), ("recent_tokens", a.lazy_recent),
                                   ("pool", a.lazy_pool), ("decode", a.lazy_decode)) if v is not None}
        if a.lazy_layers is None:
            if a.lazy_keep is not None or a.lazy_top_k is not None:
                raise _error("--lazy-keep / --lazy-top-k need --lazy-layers")
            lazy = LazyConfig.default(model.cfg.num_layers, **extra)
        else:
            lazy = LazyConfig(layers=a.lazy_layers, keep=a.lazy_keep or (), top_k=a.lazy_top_k or (), **extra)
        lazy.check(model.cfg.num_layers)
        return {"prefill": "lazy", "lazy": lazy}, {"prefill": "lazy", "lazy": repr(lazy)}
    return {}, {}


def cmd_passkey(a) -> dict:
    from lizard_jax.eval.passkey import passkey
    from lizard_jax.textio import read_text

    _check_generation_flags(a)
    if a.multihost:  # before any computation: the mesh then spans every process's devices
        import jax

        jax.distributed.initialize()
    mesh = _context_mesh(a)
    model, params, tok = _load(a, mesh)  # params on the mesh once (all processes' devices)
    if tok is None:
        raise _error(f"{a.checkpoint} has no tokenizer/ folder")
    gen_kw, described = _generation_options(a, model, mesh)
    out = passkey(model, params, tok, read_text(a.text, "--text"), lengths=a.lengths,
                  depths=a.depths, trials=a.trials, seed=a.seed, query=a.query or "question", **gen_kw)
    out.update(checkpoint=str(a.checkpoint), generation=described)
    return _sparse_note(a, out)


def cmd_mqar(a) -> dict:
    from lizard_jax.eval.mqar import mqar

    model, params, tok = _load(a)
    if tok is None:
        raise _error(f"{a.checkpoint} has no tokenizer/ folder")
    out = mqar(model, params, tok, pairs=a.pairs, lengths=a.lengths, num_queries=a.queries, trials=a.trials,
               batch_size=a.batch_size, seed=a.seed)
    out.update(checkpoint=str(a.checkpoint))
    return _sparse_note(a, out)


def _read_speed(path: str) -> dict:
    """A previous `eval.py speed` result: a file whose last non-empty line is its JSON object."""
    lines = [x for x in Path(path).read_text().splitlines() if x.strip()] if Path(path).is_file() else []
    try:
        out = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        out = None
    if not isinstance(out, dict) or out.get("task") != "speed":
        raise _error(f"{path} does not end with an eval.py speed JSON line")
    return out


def cmd_speed(a) -> dict:
    import tempfile

    from lizard_jax.eval.speed import ModelSource, SpeedOptions, plot_speed, speed_sources
    from lizard_jax.sala import PAPER_INFLLM, sparse_checkpoint_view

    if a.sparse_option and not a.sparse_prefill:
        raise _error("--sparse-option needs --sparse-prefill")
    sparse_opts = dict(a.sparse_option)
    sources = [ModelSource.parse("checkpoint", x) for x in a.checkpoint or []]
    sources += [ModelSource.parse("random", x) for x in a.random or []]
    if not sources and not a.sparse_prefill and not a.merge:
        raise _error("give at least one --checkpoint, --random, --sparse-prefill or --merge")
    with tempfile.TemporaryDirectory(prefix="sparse_view_") as tmp:
        originals = {}  # label -> the checkpoint a sparse view stands for
        for i, x in enumerate(a.sparse_prefill or []):
            src = ModelSource.parse("checkpoint", x)
            label = src.label if "=" in x else f"{src.label}-sparse"
            view = sparse_checkpoint_view(src.path, Path(tmp) / str(i), **sparse_opts)  # config only, no copy
            sources.append(ModelSource(label, "checkpoint", str(view)))
            originals[label] = src.path
        out = None
        if sources:
            opts = SpeedOptions(batch=a.batch, decode_tokens=a.decode_tokens, warmup=a.warmup, reps=a.reps)
            out = speed_sources(sources, a.contexts, opts, dtype=a.dtype, isolate=a.isolate)
            for label, path in originals.items():
                out["models"][label].update(path=path, sparse_prefill={**PAPER_INFLLM, **sparse_opts})
    for path in a.merge or []:  # earlier runs (e.g. one model per command), on the same device and options
        old = _read_speed(path)
        if out is None:
            out = old
            continue
        for key in ("device", "options"):
            if old[key] != out[key]:
                raise _error(f"{path} was measured with {key} {old[key]}, this run with {out[key]}")
        clash = sorted(set(old["models"]) & set(out["models"]))
        if clash:
            raise _error(f"{path} repeats model label(s) {clash}; name models with LABEL=PATH")
        out["models"].update(old["models"])
        out["contexts"] = sorted(set(out["contexts"]) | set(old["contexts"]))
    if a.plot:
        opts = out["options"]
        title = (f"{out['device']}, batch {opts['batch']}, {opts['decode_tokens']} decode tokens, "
                 f"median of {opts['reps']}")
        out["plot"] = str(plot_speed(out["models"], a.plot, title=title))
    return out


def _devices_flag(argv: list[str]) -> int | None:
    """perplexity / passkey --devices, read before the real parser: that one comes with lizard_jax, which imports
    jax."""
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    pre.add_argument("--devices", type=int, default=None)
    try:
        return pre.parse_known_args(argv)[0].devices
    except argparse.ArgumentError:  # the real parser reports it
        return None


def main(argv=None) -> int:
    n = _devices_flag(sys.argv[1:] if argv is None else argv)
    if n is not None and n >= 1:
        _simulate_cpu_devices(n)
    from lizard_jax import cli

    return cli.command(_run)(argv)


def _run(argv) -> int:
    from lizard_jax.cli import ArgumentParser, int_at_least

    ap = ArgumentParser(prog="eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="task", required=True)
    p = sub.add_parser("perplexity", help="perplexity over non-overlapping windows of a text file")
    _add_common(p)
    p.add_argument("--text", required=True, help="text file (.txt, .txt.xz or .txt.gz)")
    p.add_argument("--seq-len", type=int_at_least(2), default=1024, help="window length in tokens")
    p.add_argument("--max-tokens", type=int_at_least(2), default=None, help="score the first N tokens only")
    p.add_argument("--batch-size", type=int_at_least(1), default=4)
    _add_context_parallel(p, "window", "seq-len")
    p.set_defaults(fn=cmd_perplexity)
    p = sub.add_parser("passkey", help="passkey retrieval at several lengths and depths")
    _add_common(p)
    p.add_argument("--text", required=True, help="filler text file")
    p.add_argument("--lengths", type=_ints, default=[4096], help="comma-separated prompt lengths in tokens")
    p.add_argument("--depths", type=_floats, default=[0, 0.25, 0.5, 0.75, 1], help="comma-separated depths in [0, 1]")
    p.add_argument("--trials", type=int_at_least(1), default=1, help="trials per (length, depth)")
    p.add_argument("--seed", type=int, default=0)
    _add_generation(p)
    p.set_defaults(fn=cmd_passkey)
    p = sub.add_parser("mqar", help="multi-query associative recall over single-token key-value pairs")
    _add_common(p)
    p.add_argument("--pairs", type=_ints, default=[8, 32, 128], help="comma-separated numbers of pairs")
    p.add_argument("--lengths", type=_ints, default=[],
                   help="comma-separated prompt lengths in tokens, filled with as many pairs as fit")
    p.add_argument("--queries", type=int, default=16, help="queries per prompt (at most the number of pairs)")
    p.add_argument("--trials", type=int, default=10, help="prompts per setting")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_mqar)
    p = sub.add_parser("speed", help="prefill / decode speed and memory vs context, several models side by side")
    p.add_argument("--checkpoint", action="append", metavar="[LABEL=]DIR", help="checkpoint folder (repeatable)")
    p.add_argument("--random", action="append", metavar="[LABEL=]CONFIG",
                   help="ModelConfig JSON file measured with random parameters (repeatable)")
    p.add_argument("--contexts", type=_ints, default=[1024, 2048, 4096, 8192], help="comma-separated lengths")
    p.add_argument("--decode-tokens", type=int, default=64, help="decode steps timed after each prefill")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    p.add_argument("--reps", type=int, default=5, help="timed calls (the median is reported)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute and parameter dtype (parameters are cast, as served); default: the checkpoint's")
    p.add_argument("--isolate", action="store_true",
                   help="one fresh subprocess per (model, context): peak_bytes is that context's own")
    p.add_argument("--sparse-prefill", action="append", metavar="[LABEL=]DIR",
                   help="checkpoint folder measured as its training-free sparse teacher (repeatable)")
    _add_sparse_option(p)
    p.add_argument("--plot", default=None, help="write a PNG plot here")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="earlier speed results (files ending with their JSON line) to add to the table/plot")
    p.set_defaults(fn=cmd_speed)
    a = ap.parse_args(argv)
    result = a.fn(a)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
