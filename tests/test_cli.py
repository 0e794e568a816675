"""The command line as a user meets it: `python -m antimatter.cli` in a subprocess. Every kind of bad input ends
with one line `antimatter CMD: error: ...` that names the problem, exit code 2 and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from antimatter.cli import FLAGS, STAGES, build_parser, flag_overrides, resolve
from antimatter.config import load_config, setting_type


def cli(*args: str, cwd: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "120", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "antimatter.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def assert_user_error(r: subprocess.CompletedProcess, cmd: str, *fragments: str) -> str:
    """Exit 2, no traceback, and exactly one error line (the last one on stderr) naming the problem."""
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(f"antimatter {cmd}: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    assert not any("error" in ln.lower() for ln in lines[:-1]), r.stderr
    for f in fragments:
        assert f in errors[0], (f, errors[0])
    return errors[0]


def test_help_lists_every_stage(tmp_path):
    r = cli("--help", cwd=tmp_path)
    assert r.returncode == 0
    for stage in ("prepare", "tokenizer", "tokenize", "train", "eval", "generate", "export", "import", "pipeline",
                  "quickstart", "info"):
        assert stage in STAGES
        assert f"    {stage}" in r.stdout, stage
    r = cli(cwd=tmp_path)  # no command: the help, and a non-zero exit
    assert r.returncode == 2 and "COMMAND" in r.stdout


def test_info_prints_the_seed_model_count(tmp_path):
    r = cli("info", "--model", "seed-300m", "recipe=gpt2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "355,871,744" in r.stdout  # total
    assert "302,311,424" in r.stdout and "53,560,320" in r.stdout  # non-embedding, embedding
    text = " ".join(r.stdout.split())  # rich wraps the title to the terminal width
    assert "24 layers, d_model 1024, 16 heads, vocab 50,257, context 2,048" in text
    assert "2.727 GFLOP" in text


def test_prepare_missing_path(tmp_path):
    r = cli("prepare", str(tmp_path / "nope"), cwd=tmp_path)
    assert_user_error(r, "prepare", "input path does not exist", str(tmp_path / "nope"))


def test_prepare_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    r = cli("prepare", str(tmp_path / "empty"), "--name", "e", cwd=tmp_path)
    assert_user_error(r, "prepare", "the corpus is empty", str(tmp_path / "empty"))


@pytest.mark.parametrize("cmd, args, fragments", [
    ("train", ["train.lrr=1e-3"], ["unknown config key 'train.lrr'", "did you mean 'train.lr'?"]),
    ("info", ["model.n_layr=3"], ["unknown config key 'model.n_layr'", "did you mean 'model.n_layer'?"]),
    ("train", ["train.max_steps=abc"], ["train.max_steps: expected an integer, got 'abc'"]),
    ("tokenize", ["train.compile=perhaps"], ["train.compile: expected true or false, got 'perhaps'"]),
    ("info", ["model.n_head=5"], ["model.d_model (768) must be divisible by model.n_head (5)", "n_head=4"]),
    ("train", ["model=tiny", "train.seq_len=128"],
     ["train.seq_len (128) is longer than the model's context model.block_size (64)", "lower train.seq_len"]),
    ("info", ["--model", "seed-300"], ["unknown model preset 'seed-300'", "did you mean 'seed-300m'?", "llama-300m"]),
    ("pipeline", ["model=nope"], ["unknown model preset 'nope'", "tiny, quickstart"]),
    ("info", ["train.lr"], ["unexpected argument 'train.lr'", "section.key=value"]),
    ("info", ["--config", "missing.yaml"], ["config file not found: missing.yaml"]),
])
def test_bad_config_input(tmp_path, cmd, args, fragments):
    assert_user_error(cli(cmd, *args, cwd=tmp_path), cmd, *fragments)
    assert not (tmp_path / "runs").exists()  # nothing written before the config is valid


def test_invalid_yaml_config(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  lr: [1,\n")
    assert_user_error(cli("train", "--config", "bad.yaml", cwd=tmp_path), "train", "bad.yaml is not valid YAML")


def test_stage_before_its_input_exists(tmp_path):
    assert_user_error(cli("tokenizer", "--name", "r", cwd=tmp_path), "tokenizer", "prepared data not found",
                      "antimatter prepare")
    assert_user_error(cli("train", "--name", "r", cwd=tmp_path), "train", "token shards not found",
                      "antimatter tokenize")


def test_generate_on_missing_run(tmp_path):
    r = cli("generate", "--run", str(tmp_path / "missing"), "--prompt", "hi", cwd=tmp_path)
    assert_user_error(r, "generate", f"run folder {tmp_path / 'missing'} does not exist", "--run")
    (tmp_path / "afile").write_text("not a run")
    r = cli("generate", "--run", str(tmp_path / "afile"), "--prompt", "hi", cwd=tmp_path)
    assert_user_error(r, "generate", f"run folder {tmp_path / 'afile'} is a file, not a run folder", "--run")


def test_eval_on_run_without_checkpoints(tmp_path):
    """An empty run folder, and one whose only step folder is half-written (no weights, no manifest); the two
    subprocesses run side by side (each spends seconds importing torch before it can answer)."""
    bare, half = tmp_path / "bare", tmp_path / "half"
    bare.mkdir()
    (half / "checkpoints" / "step_000010").mkdir(parents=True)
    (half / "checkpoints" / "step_000010" / "config.yaml").write_text("model: tiny\n")
    (half / "checkpoints" / "latest").write_text("step_000010\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "antimatter.cli", "eval", "--run", str(run), *extra],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for run, extra in ((bare, []), (half, ["--checkpoint", "latest"]))]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    assert_user_error(results[0], "eval", "no complete checkpoint", str(bare), "antimatter train")
    assert_user_error(results[1], "eval", f"checkpoint {half / 'checkpoints' / 'step_000010'} is incomplete")


def test_info_unknown_gpu_prints_only_the_error(tmp_path):
    r = cli("info", "--model", "tiny", "--gpu", "XYZ", cwd=tmp_path)
    assert_user_error(r, "info", "unknown GPU 'XYZ'", "H100", "T4")
    assert r.stdout == ""


# ------------------------------------------------------------------------------- options are dotted keys


REQUIRED = {"export": ["--out", "o"], "import": ["--hf", "h", "--out", "o"]}  # options a command cannot lack
SAMPLES = {"name": "exp", "runs_dir": "elsewhere", "model": "tiny", "train.resume": "none", "generate.device": "cpu"}


def _sample(key: str):
    """A valid value of the key that is not its default."""
    if key in SAMPLES:
        return SAMPLES[key]
    tp = setting_type(key)
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)[-1]
    return {bool: True, int: 3, float: 0.5, str: "latest"}[tp]


def test_every_old_option_is_still_there():
    have = {(f.option, c) for f in FLAGS for c in f.commands}
    old = [("--workers", "prepare"), ("--keep-rejects", "prepare"), ("--strict", "prepare"), ("--resume", "train"),
           ("--checkpoint", "eval"), ("--checkpoint", "generate"), ("--checkpoint", "export"), ("--dtype", "export"),
           ("--device", "generate"), ("--compile", "generate"), ("--int8", "generate"), ("--model", "info")]
    old += [(o, "generate") for o in ("--max-new-tokens", "--temperature", "--top-k", "--top-p",
                                      "--repetition-penalty", "--seed")]
    old += [(o, c) for o in ("--name", "--runs-dir") for c in STAGES]
    assert set(old) <= have, set(old) - have


@pytest.mark.parametrize("flag", FLAGS, ids=lambda f: f"{f.option}:{f.key}")
def test_each_option_is_its_dotted_key(flag):
    """`--option VALUE` loads the same config as `key=VALUE`, on every command that has the option."""
    value = _sample(flag.key)
    dotted = f"{flag.key}={'true' if value is True else value}"
    for command in flag.commands:
        argv = [command, flag.option, *([] if value is True else [str(value)]), *REQUIRED.get(command, [])]
        via_option = load_config(None, flag_overrides(build_parser().parse_args(argv)))
        assert via_option == load_config(None, [dotted]), (command, flag.option)
        assert via_option != load_config(), (command, flag.option)  # it did set something


def test_a_bad_option_value_is_named_as_typed(tmp_path):
    r = cli("prepare", "--workers", "-2", cwd=tmp_path)
    assert_user_error(r, "prepare", "--workers must be >= 0 (0 = all cores), got -2")
    r = cli("export", "--out", "o", "--dtype", "int8", cwd=tmp_path)
    assert_user_error(r, "export", "--dtype must be fp32, fp16 or bf16, got 'int8'")
    assert not (tmp_path / "runs").exists()


def test_options_and_keys_reach_the_commands(tmp_path):
    """An option given wins over its dotted key; generate and export take their settings from their sections
    (generate.device null: the run's train.device, as before the section existed); a run's own config.yaml is
    the config of the commands that read that run. Resolved, not run: dispatch hands exactly this config on."""

    def resolved(*argv: str):
        return resolve(build_parser().parse_args(list(argv))).cfg

    assert resolved("prepare", "--workers", "2", "data.workers=5").data.workers == 2
    assert resolved("prepare", "data.workers=5").data.workers == 5
    assert resolved("train", "--resume", "none").train.resume == "none"
    g = resolved("generate", "--run", "r", "--device", "cpu", "--top-k", "3", "--compile").generate
    assert (g.device, g.top_k, g.compile, g.checkpoint, g.int8) == ("cpu", 3, True, "best", False)
    g = resolved("generate", "--run", "r", "generate.device=cpu", "generate.checkpoint=latest").generate
    assert (g.device, g.checkpoint) == ("cpu", "latest")
    cfg = resolved("generate", "--run", "r", "train.device=cpu")
    assert (cfg.generate.device, cfg.train.device) == (None, "cpu")
    e = resolved("export", "--out", "o", "export.dtype=bf16", "--checkpoint", "latest").export
    assert (e.dtype, e.checkpoint) == ("bf16", "latest")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("generate:\n  top_k: 9\n  temperature: 0.5\n")
    g = resolved("generate", "--run", str(run), "--top-k", "4").generate
    assert (g.top_k, g.temperature) == (4, 0.5)
    inv = resolve(build_parser().parse_args(["prepare", "a.txt", "data.workers=3", "--out", "o"]))
    assert (inv.command, inv.paths, inv.args.out, inv.cfg.data.workers) == ("prepare", ["a.txt"], "o", 3)
