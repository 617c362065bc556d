"""Every command line turns a bad input into one `error: ...` line on stderr and exit status 2 (lizard_jax.cli).

One table of bad inputs across train.py, eval.py, convert, adapter, export, lm_eval and sala select; each row runs
the entry point's `main(argv)` in this process and checks the status, that stderr holds no traceback and ends in
its only error line, and a distinctive part of the message. The inputs are built once per module around a tiny
random teacher. Paths in a row are `{name}` fields of the `paths` fixture.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import jax
import pytest
import yaml

import lizard_jax
from lizard_jax import adapter, checkpoint
from lizard_jax.convert.__main__ import main as convert_main
from lizard_jax.export import main as export_main
from lizard_jax.recipes import student_config
from lizard_jax.sala import main as sala_main
from lizard_jax.testing import cli_error, save_tiny_teacher

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as eval_py  # noqa: E402
import train as train_py  # noqa: E402

TEXT = "\n\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog, {i * 7 % 13} times." for i in range(300))
HAS_TFDS = importlib.util.find_spec("tensorflow_datasets") is not None


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("cli")
    tcfg = save_tiny_teacher(d / "teacher", num_layers=2)
    _, tparams, _ = lizard_jax.load(d / "teacher")

    def copy(name, change):  # a copy of the teacher folder, changed
        shutil.copytree(d / "teacher", d / name)
        change(d / name)

    copy("notok", lambda p: shutil.rmtree(p / "tokenizer"))
    copy("badconfig", lambda p: (p / "config.json").write_text("{not json"))
    copy("badtok", lambda p: (p / "tokenizer" / "tokenizer.json").write_text("{not json"))
    copy("badparams", lambda p: [f.write_bytes(b"garbage") for f in (p / "params").rglob("*") if f.is_file()])
    student = student_config(tcfg, {"default": {"kind": "lizard", "window": 8, "meta_tokens": 2}})
    copy("studentcfg", lambda p: student.to_json(p / "config.json"))  # export refuses it from the config alone
    save_tiny_teacher(d / "other", seed=1, num_layers=2)

    # an adapter whose student changed one norm of the teacher
    changed = jax.tree_util.tree_map(lambda x: x, tparams)
    changed["final_norm"]["scale"] = changed["final_norm"]["scale"] * 2
    adapter.save(d / "adapter", tcfg, changed, tcfg, tparams)
    shutil.copytree(d / "adapter", d / "badinfo")
    (d / "badinfo" / "adapter.json").write_text("[]")
    shutil.copytree(d / "adapter", d / "badparts")
    info = json.loads((d / "badparts" / "adapter.json").read_text())
    info["parts"]["lora"] = {"tensors": 1, "values": 1}
    (d / "badparts" / "adapter.json").write_text(json.dumps(info))

    (d / "text.txt").write_text(TEXT)
    (d / "short.txt").write_text("Too short.")
    (d / "one.txt").write_text("a")
    (d / "empty.txt").write_text("  \n")
    (d / "binary.txt").write_bytes(b"\xff\xfe\x00text")
    (d / "badline.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (d / "nofield.jsonl").write_text('{"body": "no text key"}\n')
    (d / "fake.gguf").write_bytes(b"GGUF but not really")
    (d / "hf").mkdir()
    (d / "hf" / "config.json").write_text("{oops")
    (d / "hf" / "model.safetensors").write_bytes(b"")

    train = {"teacher": str(d / "teacher"), "run_dir": str(d / "run"), "dtype": "float32", "mesh": {"data": 1},
             "student": {"attention": {"default": {"kind": "lightning"}}},  # the quickest to compile (NaN test)
             "data": {"source": "text", "paths": [str(d / "text.txt")], "seq_len": 16, "batch_size": 2},
             "stage1": {"steps": 2, "lr": 1e-3}, "checkpoint": {"every": 1, "keep": 3, "async_save": False},
             "stage2": {"steps": 0, "lora": {"rank": 2, "alpha": 4}}, "log_every": 1}
    (d / "train.yaml").write_text(yaml.safe_dump(train))
    (d / "blank.yaml").write_text("")
    (d / "badyaml.yaml").write_text("stage1: [1, 2\n")
    (d / "listtop.yaml").write_text("- a\n- b\n")
    (d / "lizard_recipe.yaml").write_text(yaml.safe_dump({"attention": {"default": "lizard"}}))
    (d / "sala_recipe.yaml").write_text(yaml.safe_dump(
        {"attention": {"default": {"kind": "lightning"}, "layers": {0: {"kind": "sparse"}}}}))
    return {p.name.split(".")[0]: str(p) for p in d.iterdir()} | {"tmp": str(d)}


TRAIN = ["--config", "{train}"]
PPL = ["perplexity", "--checkpoint", "{teacher}", "--text", "{text}", "--seq-len", "16", "--max-tokens", "64"]
PASSKEY = ["passkey", "--checkpoint", "{teacher}", "--depths", "0.5"]
SELECT = ["select", "--teacher", "{teacher}", "--recipe", "{sala_recipe}", "--text", "{text}", "--steps", "1",
          "--seq-len", "16", "--batch-size", "2", "--keep", "0", "--out", "{tmp}/select.json"]
tfds_only = pytest.mark.skipif(not HAS_TFDS, reason="tensorflow-datasets is not installed")
# tensorflow-datasets is a dependency; a user's install without it is simulated by hiding the module
hide_tfds = pytest.mark.hide_tfds

ROWS = [
    # train.py: the config file
    ("train", ["--config", "{tmp}/nope.yaml"], "config file not found: .*nope.yaml"),
    ("train", ["--config", "{tmp}"], "is a folder; expected a YAML file"),
    ("train", ["--config", "{blank}"], "the data section is required"),
    ("train", ["--config", "{badyaml}"], "badyaml.yaml is not valid YAML"),
    ("train", ["--config", "{listtop}"], "listtop.yaml: top level must be a mapping"),
    ("train", [], "the following arguments are required: --config"),
    # train.py: unknown and mistyped keys
    ("train", [*TRAIN, "--set", "stage3.steps=1"], r"unknown key\(s\) \['stage3'\]"),
    ("train", [*TRAIN, "--set", "stage1.step=5"], r"TrainConfig.stage1: unknown key\(s\) \['step'\]"),
    ("train", [*TRAIN, "--set", "stage1.steps=ten"], "stage1.steps: expected int, got 'ten'"),
    ("train", [*TRAIN, "--set", "stage1.lr=1e-3"], "stage1.lr: expected a number.*write 1.0e-3"),
    ("train", [*TRAIN, "--set", "stage1.steps"], "override 'stage1.steps' is not of the form key=value"),
    ("train", [*TRAIN, "--set", "student.attention.default=linearish"], "unknown attention kind 'linearish'"),
    # train.py: values out of range (every TrainConfig range check)
    ("train", [*TRAIN, "--set", "data.seq_len=1"], "data: seq_len must be >= 2"),
    ("train", [*TRAIN, "--set", "data.batch_size=0"], "data: batch_size must be >= 1"),
    ("train", [*TRAIN, "--set", "data.max_tokens=1"], "data: max_tokens must be null or >= 2"),
    ("train", [*TRAIN, "--set", "data.source=csv"], "data.source must be text, jsonl or tfds, got 'csv'"),
    ("train", [*TRAIN, "--set", "data.paths=[]"], "data.paths is empty"),
    ("train", [*TRAIN, "--set", "stage1.steps=-1"], "stage1: steps must be >= 0"),
    ("train", [*TRAIN, "--set", "stage1.lr=0"], "stage1: lr must be > 0"),
    ("train", [*TRAIN, "--set", "stage2.warmup=1.5"], r"stage2: warmup must be in \[0, 1\]"),
    ("train", [*TRAIN, "--set", "stage2.end_lr_factor=-0.5"], r"end_lr_factor must be in \[0, 1\]"),
    ("train", [*TRAIN, "--set", "stage1.kd_weight=-1"], "kd_weight must be >= 0"),
    ("train", [*TRAIN, "--set", "stage1.kd_temperature=0"], "kd_temperature must be > 0"),
    ("train", [*TRAIN, "--set", "stage1.seq_len=1"], "stage1: seq_len must be null or >= 2"),
    ("train", [*TRAIN, "--set", "stage2.batch_size=0"], "stage2: batch_size must be null or >= 1"),
    ("train", [*TRAIN, "--set", "stage1.loss=l3"], "stage.loss must be mse or smooth_l1"),
    ("train", [*TRAIN, "--set", "stage2.lora.rank=0"], "lora: rank must be >= 1"),
    ("train", [*TRAIN, "--set", "stage2.lora.alpha=0"], "lora: alpha must be > 0"),
    ("train", [*TRAIN, "--set", "stage2.lora.targets=[w_q]"], r"lora.targets: unknown \['w_q'\]"),
    ("train", [*TRAIN, "--set", "optim.b1=1"], r"optim: b1 must be in \[0, 1\)"),
    ("train", [*TRAIN, "--set", "optim.b2=-0.1"], r"optim: b2 must be in \[0, 1\)"),
    ("train", [*TRAIN, "--set", "optim.eps=0"], "optim: eps must be > 0"),
    ("train", [*TRAIN, "--set", "optim.weight_decay=-1"], "optim: weight_decay must be >= 0"),
    ("train", [*TRAIN, "--set", "optim.clip=0"], "optim: clip must be > 0"),
    ("train", [*TRAIN, "--set", "checkpoint.every=0"], "checkpoint: every must be >= 1"),
    ("train", [*TRAIN, "--set", "checkpoint.keep=0"], "checkpoint: keep must be >= 1"),
    ("train", [*TRAIN, "--set", "log_every=0"], "log_every must be >= 1"),
    ("train", [*TRAIN, "--set", "seed=-1"], "seed must be >= 0"),
    ("train", [*TRAIN, "--set", "dtype=float16"], "dtype must be float32 or bfloat16"),
    ("train", [*TRAIN, "--set", "mesh.data=0"], "mesh must be a mapping of axis -> size"),
    ("train", [*TRAIN, "--set", "mesh.data=1000"], "mesh {'data': 1000}: .*needs 1000 devices"),
    # train.py: teacher and data
    ("train", [*TRAIN, "--set", "teacher={tmp}/noteacher"], "teacher not found: .*noteacher"),
    ("train", [*TRAIN, "--set", "teacher={notok}", "--set", "run_dir={tmp}/r_notok"],
     "notok has no tokenizer/ folder"),
    ("train", [*TRAIN, "--set", "student.attention.default=softmax", "--set", "run_dir={tmp}/r_soft"],
     "the recipe converts no layer"),
    ("train", [*TRAIN, "--set", "data.paths=[{short}]", "--set", "run_dir={tmp}/r_short"],
     "give .* tokens, fewer than one batch of 2 sequences of 16 \\+ 1 tokens"),
    ("train", [*TRAIN, "--set", "data.paths=[{tmp}/missing.txt]", "--set", "run_dir={tmp}/r_missing"],
     "data.paths .*missing.txt: no such file"),
    ("train", [*TRAIN, "--set", "data.paths=[{empty}]", "--set", "run_dir={tmp}/r_empty"],
     "data.paths .*empty.txt is empty"),
    ("train", [*TRAIN, "--set", "data.source=jsonl", "--set", "data.paths=[{badline}]", "--set", "run_dir={tmp}/r_bad"],
     "badline.jsonl:2: not valid JSON"),
    ("train", [*TRAIN, "--set", "data.source=jsonl", "--set", "data.paths=[{nofield}]",
               "--set", "run_dir={tmp}/r_nofield"], r"nofield.jsonl:1: no 'text' field \(data.text_key\)"),
    pytest.param("train", [*TRAIN, "--set", "data.source=tfds", "--set", "data.tfds_name=no_such_dataset_xyz",
                           "--set", "run_dir={tmp}/r_tfds"], "data.tfds_name 'no_such_dataset_xyz': no such TFDS",
                 marks=tfds_only, id="train-tfds-unknown-name"),
    pytest.param("train", [*TRAIN, "--set", "data.source=tfds", "--set", "data.tfds_name=no_such_dataset_xyz",
                           "--set", "run_dir={tmp}/r_tfds"], "needs TensorFlow Datasets: pip install",
                 marks=hide_tfds, id="train-tfds-not-installed"),
    # eval.py: checkpoints
    ("eval", ["perplexity", "--checkpoint", "{tmp}/nockpt", "--text", "{text}"], "checkpoint folder not found"),
    ("eval", ["perplexity", "--checkpoint", "{text}", "--text", "{text}"], "is a file; expected a lizard_jax"),
    ("eval", ["perplexity", "--checkpoint", "{hf}", "--text", "{text}"], "not a complete lizard_jax checkpoint"),
    ("eval", ["perplexity", "--checkpoint", "{badconfig}", "--text", "{text}"], "badconfig: bad config.json"),
    ("eval", ["perplexity", "--checkpoint", "{badparams}", "--text", "{text}"],
     "checkpoint .*badparams/params|cannot read checkpoint metadata"),
    ("eval", ["perplexity", "--checkpoint", "{notok}", "--text", "{text}"], "notok has no tokenizer/ folder"),
    ("eval", ["perplexity", "--checkpoint", "{badtok}", "--text", "{text}"], "badtok/tokenizer: unreadable tokenizer"),
    ("eval", ["perplexity", "--checkpoint", "{adapter}", "--text", "{text}"], "student adapter: .*pass the teacher"),
    ("eval", ["perplexity", "--checkpoint", "{teacher}", "--teacher", "{teacher}", "--text", "{text}"],
     "is a full checkpoint, not an adapter"),
    ("eval", ["perplexity", "--checkpoint", "{adapter}", "--teacher", "{other}", "--text", "{text}"],
     "is not this adapter's teacher"),
    # eval.py: texts and flags
    ("eval", [*PPL[:3], "--text", "{tmp}/missing.txt"], "--text .*missing.txt: no such file"),
    ("eval", [*PPL[:3], "--text", "{tmp}"], "--text .* is a folder"),
    ("eval", [*PPL[:3], "--text", "{empty}"], "--text .*empty.txt is empty"),
    ("eval", [*PPL[:3], "--text", "{binary}"], "--text .*binary.txt is not UTF-8 text"),
    ("eval", [*PPL[:3], "--text", "{one}"], r"--text .*one.txt is 1 token\(s\) long"),
    ("eval", [*PPL, "--seq-len", "1"], "argument --seq-len: must be >= 2, got 1"),
    ("eval", [*PPL, "--max-tokens", "many"], "argument --max-tokens: expected an integer, got 'many'"),
    ("eval", [*PPL[:3]], "the following arguments are required: --text"),
    ("eval", ["perplexitty", "--checkpoint", "{teacher}"], "invalid choice: 'perplexitty'"),
    ("eval", [*PASSKEY, "--text", "{short}", "--lengths", "300"], "filler text has .* tokens; length 300 needs"),
    ("eval", [*PASSKEY, "--text", "{text}", "--lengths", "10"], "length 10 is too short for the passkey prompt"),
    ("eval", [*PASSKEY, "--text", "{text}", "--lengths", "300", "--depths", "2"], r"depths must be in \[0, 1\]"),
    ("eval", [*PASSKEY, "--text", "{text}", "--trials", "0"], "argument --trials: must be >= 1, got 0"),
    ("eval", [*PASSKEY, "--text", "{text}", "--lengths", "4k"], "argument --lengths: expected comma-separated ints"),
    ("eval", ["mqar", "--checkpoint", "{teacher}", "--queries", "0"], "num_queries must be >= 1"),
    ("eval", ["speed", "--checkpoint", "{tmp}/nockpt"], "checkpoint source not found"),
    # convert
    ("convert", ["{tmp}/nomodel", "--out", "{tmp}/c1"], "teacher not found: .*nomodel"),
    ("convert", ["{text}", "--out", "{tmp}/c2"], "text.txt is a file but not a .gguf"),
    ("convert", ["{fake}", "--out", "{tmp}/c3"], "fake.gguf: transformers cannot read the model"),
    ("convert", ["{hf}", "--out", "{tmp}/c4"], "hf/config.json: transformers cannot read it"),
    ("convert", ["{fake}", "--out", "{teacher}"], "teacher exists; pass .*--overwrite"),
    ("convert", ["{fake}", "--out", "{tmp}/c5", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    # adapter extract | merge
    ("adapter", ["extract", "{tmp}/nostudent", "--teacher", "{teacher}", "--out", "{tmp}/a1"],
     "checkpoint folder not found: .*nostudent"),
    ("adapter", ["extract", "{adapter}", "--teacher", "{teacher}", "--out", "{tmp}/a2"],
     "is a student adapter, not a full checkpoint"),
    ("adapter", ["merge", "{badinfo}", "--teacher", "{teacher}", "--out", "{tmp}/a3"],
     "badinfo/adapter.json is missing or corrupt"),
    ("adapter", ["merge", "{badparts}", "--teacher", "{teacher}", "--out", "{tmp}/a4"],
     r"badparts/params holds parts \['changed'\], adapter.json lists \['changed', 'lora'\]"),
    ("adapter", ["merge", "{adapter}", "--teacher", "{other}", "--out", "{tmp}/a5"], "not this adapter's teacher"),
    ("adapter", ["merge", "{teacher}", "--teacher", "{teacher}", "--out", "{tmp}/a6"],
     "is a full checkpoint, not a student adapter"),
    ("adapter", ["merge", "{adapter}", "--teacher", "{teacher}", "--out", "{other}"], "other exists; pass"),
    ("adapter", ["split", "{adapter}"], "invalid choice: 'split'"),
    # export
    ("export", ["{studentcfg}", "--out", "{tmp}/e1"], r"not a teacher-type checkpoint: layer\(s\) \[0, 1\] use"),
    ("export", ["{tmp}/nockpt", "--out", "{tmp}/e2"], "checkpoint folder not found"),
    ("export", ["{adapter}", "--out", "{tmp}/e3"], "student adapter: .*pass the teacher"),
    ("export", ["{teacher}", "--out", "{text}"], "text.txt exists; pass"),
    # lm_eval
    ("lm_eval", ["--model", "lizard_jax", "--model_args", "checkpoint={tmp}/nockpt", "--tasks", "hellaswag"],
     "checkpoint folder not found: .*nockpt"),
    # sala select
    ("sala", [*SELECT, "--seq-len", "1"], "argument --seq-len: must be >= 2, got 1"),
    ("sala", [*SELECT[:4], "{tmp}/norecipe.yaml", *SELECT[5:]], "config file not found: .*norecipe.yaml"),
    ("sala", [*SELECT[:4], "{lizard_recipe}", *SELECT[5:]], "a SALA recipe needs a lightning and a sparse spec"),
    ("sala", [*SELECT[:-1], "{tmp}/nodir/select.json"], "--out .*select.json: folder .*nodir does not exist"),
    ("sala", [*SELECT, "--update-config", "{tmp}/nocfg.yaml"], "--update-config .*nocfg.yaml: no such file"),
    ("sala", [*SELECT, "--eval-fraction", "1.5"], r"eval_fraction \(--eval-fraction\) must be in \(0, 1\)"),
    ("sala", [*SELECT[:6], "{tmp}/missing.txt", *SELECT[7:]], "--text .*missing.txt: no such file"),
]


def _main(name):
    if name == "lm_eval":
        pytest.importorskip("lm_eval")
        from lizard_jax.lm_eval import main

        return main
    return {"train": train_py.main, "eval": eval_py.main, "convert": convert_main, "adapter": adapter.main,
            "export": export_main, "sala": sala_main}[name]


def _id(row):
    name, argv, _ = row
    return f"{name}-" + "-".join(re.sub(r"[{}]", "", a).strip("-").replace("/", "_")[:24] for a in argv[-2:])


@pytest.mark.parametrize("entry,argv,match", [r if hasattr(r, "marks") else pytest.param(*r, id=_id(r))
                                              for r in ROWS])
def test_bad_input_is_one_error_line_and_status_2(paths, capsys, monkeypatch, request, entry, argv, match):
    if request.node.get_closest_marker("hide_tfds"):
        monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # `import` then raises ImportError
    line = cli_error(capsys, _main(entry), [a.format(**paths) for a in argv], match)
    assert len(line) < 2000  # a message, not a dump


def test_the_table_covers_every_cli():
    assert len(ROWS) >= 40
    assert {r.values[0] if hasattr(r, "marks") else r[0] for r in ROWS} == {
        "train", "eval", "convert", "adapter", "export", "lm_eval", "sala"}


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(paths, capsys):
    """lr 1e30: step 1 runs at the warmup's lr 0, step 2's update blows the parameters up, step 3's loss is not
    finite; its state is not checkpointed and no student is exported."""
    run = Path(paths["tmp"]) / "r_nan"
    cli_error(capsys, train_py.main, ["--config", paths["train"], "--set", f"run_dir={run}",
                                      "--set", "stage1.steps=3", "--set", "stage1.lr=1.0e+30"],
              r"stage 1, step 3: the loss is (nan|inf) \(training diverged\); the last good checkpoint is step 2")
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")) == ["1", "2"]
    assert not (run / "student").exists() and not (run / "adapter").exists()


def test_a_bug_still_shows_its_traceback(paths, monkeypatch):
    """Only user errors are folded into one line: anything else propagates (here a KeyError inside export)."""
    from lizard_jax import export

    def boom(*a, **k):
        raise KeyError("a bug")

    monkeypatch.setattr(export, "export", boom)
    with pytest.raises(KeyError, match="a bug"):
        export_main([paths["teacher"], "--out", f"{paths['tmp']}/e_bug"])


def test_a_failed_write_leaves_no_folder(paths, monkeypatch):
    """write_folder fills a temporary sibling and renames it at the end: a write that fails half-way leaves
    neither the target (so `lizard_jax.load` finds nothing) nor the temporary folder, and an existing target
    with --overwrite keeps its old content."""
    tmp = Path(paths["tmp"]) / "w"
    tmp.mkdir()

    def half(folder: Path):
        (folder / "config.json").write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.write_folder(tmp / "out", half, checkpoint.FORMAT)
    assert list(tmp.iterdir()) == []
    shutil.copytree(paths["teacher"], tmp / "kept")
    with pytest.raises(OSError, match="disk full"):
        checkpoint.write_folder(tmp / "kept", half, checkpoint.FORMAT, overwrite=True)
    assert [p.name for p in tmp.iterdir()] == ["kept"]
    assert lizard_jax.load(tmp / "kept")[0].cfg.num_layers == 2
