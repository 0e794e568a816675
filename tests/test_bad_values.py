"""Bad values in settings, options and files: each is refused with one line `antimatter CMD: error: ...` (exit 2)
that names the key or file and the fix, before any work, never a traceback, a hang or a silently wrong result.
Valid values keep their meaning."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from test_cli import assert_user_error, cli
from test_no_data_loss import write_corpus

from antimatter.config import RunConfig, load_config, preset_model
from antimatter.model.generate import generate
from antimatter.model.gpt import GPT


def cli_many(cases: list[tuple[str, ...]], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Several CLI calls side by side: each spends most of its time importing, not working."""
    with ThreadPoolExecutor(3) as pool:
        return list(pool.map(lambda args: cli(*args, cwd=cwd), cases))


def cli_stdin(*args: str, stdin: str, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI with typed input (the interactive generate session)."""
    return subprocess.run([sys.executable, "-m", "antimatter.cli", *args], cwd=cwd, input=stdin, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run folder (tokenizer, checkpoint) of the tiny model, trained two steps: enough to generate."""
    from test_eval import build_tiny_run

    return build_tiny_run(tmp_path_factory.mktemp("badvalues"), steps=2)


# ------------------------------------------------------------------------------------ config fields


def _numeric_fields(cls: type, prefix: str = ""):
    """(dotted key, class, field name, annotation) of every int / float setting, nested sections included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else (args[0] if args else tp)
        if dataclasses.is_dataclass(inner):
            yield from _numeric_fields(inner, f"{prefix}{f.name}.")
        elif inner in (int, float):
            yield f"{prefix}{f.name}", cls, f.name, inner


def test_every_numeric_setting_has_a_range_that_its_default_satisfies():
    """A new setting without a range would accept any number: the check is the whole table, not a case."""
    from antimatter.config import BOUNDS

    fields = list(_numeric_fields(RunConfig))
    assert len(fields) > 100
    for key, cls, name, _ in fields:
        assert name in BOUNDS.get(cls, {}), f"{key} has no range in antimatter.config.BOUNDS"
    load_config(None, [])
    for preset in ("tiny", "seed-300m", "llama-300m"):
        load_config(None, [f"model={preset}"])


@pytest.mark.parametrize("override, fragments", [
    ("data.filters.max_doc_bytes=-1", ["data.filters.max_doc_bytes must be >= 0 (0 = no limit), got -1"]),
    ("data.filters.max_words=-3", ["data.filters.max_words must be >= 0"]),
    ("data.filters.min_alpha_words=1.5", ["data.filters.min_alpha_words must be in [0, 1], got 1.5"]),
    ("data.filters.max_top_ngram_chars=[0.2, 2, 0.1]", ["data.filters.max_top_ngram_chars[1] must be in [0, 1]"]),
    ("data.sources=[{path: x, max_bytes: -1}]", ["data.sources[0].max_bytes must be >= 0"]),
    ("data.dedup.threshold=2", ["data.dedup.threshold must be in (0, 1], got 2.0"]),
    ("data.dedup.num_perm=1", ["data.dedup.num_perm must be >= 2, got 1"]),
    ("data.workers=-2", ["data.workers must be >= 0 (0 = all cores), got -2"]),
    ("tokenizer.min_frequency=-1", ["tokenizer.min_frequency must be >= 0"]),
    ("model.norm_eps=0", ["model.norm_eps must be positive, got 0.0"]),
    ("model.pad_vocab_multiple=1000000000000", ["model.pad_vocab_multiple must be in [0, "]),
    ("train.beta2=1.5", ["train.beta2 must be in [0, 1), got 1.5"]),
    ("train.seed=-1", ["train.seed must be in [0, ", "got -1"]),
    (f"train.seed={2**70}", ["train.seed must be in [0, ", f"got {2**70}"]),
    ("eval.seed=-7", ["eval.seed must be in [0, "]),
    ("train.warmup_steps=-10", ["train.warmup_steps must be >= 0"]),
    ("eval.sample.top_k=-5", ["eval.sample.top_k must be >= 0 (0 = off), got -5"]),
    ("generate.repetition_penalty=0", ["generate.repetition_penalty must be positive (1 = off), got 0.0"]),
    ("generate.top_p=1.5", ["generate.top_p must be in [0, 1], got 1.5"]),
    ("train.device=banana", ["train.device 'banana' is not a device", "auto, cpu, cuda, cuda:N or mps"]),
    ("eval.device=cuda:x", ["eval.device 'cuda:x' is not a device"]),
    ("train.device=xla", ["train.device 'xla' is not a device AntiMatter runs on", "cuda:N or mps"]),
    ("train.device=hpu", ["train.device 'hpu' is not a device AntiMatter runs on"]),
    ("eval.device=meta", ["eval.device 'meta' is not a device AntiMatter runs on"]),
    ("model.preset=5", ["model.preset: expected a preset name (tiny, ", "got 5"]),
    ("train.max_nonfinite=0", ["train.max_nonfinite must be positive, got 0"]),
    ("model.d_model=100000000003", ["model.d_model (100000000003) must be divisible by model.n_head (12)"]),
])
def test_out_of_range_settings_are_refused_before_any_work(tmp_path, override, fragments):
    """`info` reads the whole config and does no work: the one-line error, and nothing written."""
    r = cli("info", override, cwd=tmp_path)
    assert_user_error(r, "info", *fragments)
    assert r.stdout == "" and not (tmp_path / "runs").exists()


def test_max_doc_bytes_zero_means_no_limit_as_every_size_cap_does(tmp_path):
    """0 = no limit, as data.sources[].max_bytes and tokenizer.train_bytes: not 'remove every document'."""
    write_corpus(tmp_path / "corpus", n=10)
    r0, r1 = cli_many([("prepare", "corpus", "--out", "zero", "data.filters.max_doc_bytes=0", "data.workers=1"),
                       ("prepare", "corpus", "--out", "default", "data.workers=1")], cwd=tmp_path)
    assert r0.returncode == 0 and r1.returncode == 0, r0.stderr + r1.stderr
    counts = [json.loads((tmp_path / d / "manifest.json").read_text())["counts"] for d in ("zero", "default")]
    assert counts[0] == counts[1] and counts[0]["kept_docs"] == 20, counts


# ------------------------------------------------------------------------------------ generate


@pytest.mark.parametrize("args, fragments", [
    (["--repetition-penalty", "0"], ["--repetition-penalty must be positive (1 = off), got 0.0"]),
    (["--temperature", "nan"], ["--temperature must be a finite number, got nan"]),
    (["--temperature", "-1"], ["--temperature must be >= 0 (0 = greedy), got -1.0"]),
    (["--top-k", "-5"], ["--top-k must be >= 0 (0 = off), got -5"]),
    (["--top-p", "inf"], ["--top-p must be a finite number, got inf"]),
    (["--max-new-tokens", "-3"], ["--max-new-tokens must be >= 0, got -3"]),
    (["--seed", str(2**70)], ["--seed must be in [0, ", f"got {2**70}"]),
    (["--seed", "-1"], ["--seed must be in [0, ", "got -1"]),
    (["--device", "banana"], ["--device 'banana' is not a device", "cpu"]),
    (["--device", "cuda:-1"], ["--device 'cuda:-1' is not a device"]),
])
def test_bad_generate_options(tiny_run, args, fragments):
    r = cli("generate", "--run", str(tiny_run), "--prompt", "def ", *args, cwd=tiny_run.parent)
    assert_user_error(r, "generate", *fragments)
    assert r.stdout == ""  # refused before the model loads: not even the prompt is echoed


def test_valid_generate_options_still_generate(tiny_run):
    r = cli("generate", "--run", str(tiny_run), "--prompt", "def ", "--top-p", "0", "--temperature", "0",
            "--top-k", "0", "--seed", "0", "--max-new-tokens", "5", "--device", "cpu", cwd=tiny_run.parent)
    assert r.returncode == 0 and r.stdout.startswith("def ") and "tokens/s on cpu" in r.stderr, r.stderr


def test_bad_value_in_the_interactive_session_keeps_it_going(tiny_run):
    """A typo at the `>>>` prompt prints one line and keeps the old value; the session goes on."""
    typed = "/top_k -5\n/temp nan\n/rep 0\n/seed -1\n/max 3\n/settings\nhello\n"
    r = cli_stdin("generate", "--run", str(tiny_run), stdin=typed, cwd=tiny_run.parent)
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    assert r.returncode == 0, r.stderr
    for line in ("/top_k must be >= 0 (0 = off), got -5", "/temp must be a finite number, got nan",
                 "/rep must be positive (1 = off), got 0.0", "/seed must be in [0, "):
        assert line in r.stdout, (line, r.stdout)
    assert "max_new_tokens=3, temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.0, seed=None" in r.stdout
    assert "on cpu, 1 thread" in r.stdout  # the prompt after the mistakes was answered
    assert "max_new_tokens = 3" in r.stdout  # a value taken is said back


def test_an_empty_line_in_the_interactive_session_does_not_end_it(tiny_run):
    """An Enter pressed twice keeps the session (and its loaded model); Ctrl-D (end of input) ends it."""
    r = cli_stdin("generate", "--run", str(tiny_run), stdin="\n\n/max 2\nhello\n", cwd=tiny_run.parent)
    assert r.returncode == 0 and "Traceback" not in r.stdout + r.stderr, r.stderr
    assert "max_new_tokens = 2" in r.stdout and "on cpu, 1 thread" in r.stdout, r.stdout


def test_generate_refuses_sampling_values_that_would_emit_nothing():
    """The library call too: nan or a zero penalty would quietly give nonsense or no tokens."""
    torch.manual_seed(0)
    model = GPT(preset_model("tiny")).eval()
    for kwargs, match in ((dict(temperature=math.nan), "temperature"), (dict(top_k=-5), "top_k"),
                          (dict(top_p=1.5), "top_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
                          (dict(repetition_penalty=math.inf), "repetition_penalty"), (dict(seed=-1), "seed")):
        with pytest.raises(ValueError, match=match):
            generate(model, [[1, 2, 3]], 4, **kwargs)
    assert len(generate(model, [[1, 2, 3]], 4, temperature=0.0, top_p=0.0)[0]) == 4


# ------------------------------------------------------------------------------------------ info


@pytest.mark.parametrize("args, fragments", [
    (["--micro-batch=-4"], ["--micro-batch must be positive, got -4"]),
    (["--micro-batch", "0"], ["--micro-batch must be positive, got 0"]),
    (["--gpu", "H100", "--tokens=-1e9"], ["--tokens must be a positive number, got -1e+09"]),
    (["--gpu", "H100", "--tokens", "nan"], ["--tokens must be a positive number, got nan"]),
    (["--gpu", "H100", "--tokens", "inf"], ["--tokens must be a positive number, got inf"]),
])
def test_bad_info_options(tmp_path, args, fragments):
    r = cli("info", "--model", "tiny", *args, cwd=tmp_path)
    assert_user_error(r, "info", *fragments)
    assert r.stdout == ""


def test_valid_info_options_unchanged(tmp_path):
    r = cli("info", "--model", "tiny", "--micro-batch", "4", "--gpu", "H100", "--tokens", "1e9", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "1,000,000,000 tokens in ~" in r.stdout and "-0.0" not in r.stdout


# ------------------------------------------------------------------------------------------ files


def test_deeply_nested_yaml_is_one_line(tmp_path):
    (tmp_path / "deep.yaml").write_text("eval:\n  prompts: " + "[" * 100_000 + "]" * 100_000 + "\n")
    deep = "[" * 5000 + "]" * 5000
    r_file, r_override = cli_many([("info", "--config", "deep.yaml"), ("info", f"eval.prompts={deep}")], tmp_path)
    assert_user_error(r_file, "info", "deep.yaml", "nested deeper than")
    assert_user_error(r_override, "info", "eval.prompts", "nested deeper than")


def test_config_file_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert_user_error(cli("info", "--config", "latin1.yaml", cwd=tmp_path), "info", "latin1.yaml is not UTF-8",
                      "byte 0xe9 at offset 9", "save it as UTF-8")


def test_malformed_stage_manifest_means_redo_or_refuse(tmp_path):
    """A stage folder's manifest.json is a JSON value someone may have edited: a manifest that is not an object
    is not this stage's (refused, nothing deleted); one whose `outputs` is not a mapping is not current (redone)."""
    write_corpus(tmp_path / "corpus", n=10)
    for name, text in (("other", "[1, 2]"), ("deep", "[" * 100_000)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(text)
    r = cli("prepare", "corpus", "--name", "r", "data.workers=1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    manifest = tmp_path / "runs" / "r" / "data" / "manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "outputs": list(m["outputs"])}))
    r_run, r_other, r_deep = cli_many([("prepare", "corpus", "--name", "r", "data.workers=1"),
                                       ("prepare", "corpus", "--out", "other", "data.workers=1"),
                                       ("prepare", "corpus", "--out", "deep", "data.workers=1")], tmp_path)
    assert r_run.returncode == 0 and "up to date" not in r_run.stderr, r_run.stderr
    assert isinstance(json.loads(manifest.read_text())["outputs"], dict)  # redone
    for r, name, text in ((r_other, "other", "[1, 2]"), (r_deep, "deep", "[" * 100_000)):
        assert_user_error(r, "prepare", "did not write", "nothing was deleted")
        assert (tmp_path / name / "manifest.json").read_text() == text


@pytest.mark.parametrize("files", [["model.safetensors"], {"model.safetensors": 5}, "x"])
def test_checkpoint_manifest_whose_files_is_not_a_mapping_is_one_line(tiny_run, tmp_path, files):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (manifest,) = (run / "checkpoints").glob("step_*/manifest.json")
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "files": files}))
    r = cli("generate", "--run", str(run), "--prompt", "def ", cwd=tmp_path)
    assert_user_error(r, "generate", f"checkpoint manifest {manifest} is unreadable", "use another checkpoint")


GOOD_RESULT = {"checkpoint": {"step": 2}, "val": {"loss": 5.0, "perplexity": 148.4, "by_source": {"a": {
    "bits_per_byte": 2.5}}}, "files": [{"path": "x.txt", "bits_per_byte": 1.5}]}


@pytest.mark.parametrize("text, fragment", [
    ("[1, 2]", "an evaluation result (a JSON array, not an object)"),
    ("[" * 100_000, "is not valid JSON"),
    ('{"val": 5}', "val is 5"),
    ('{"val": {"perplexity": "abc"}}', "val.perplexity is 'abc'"),
    ('{"files": [1]}', "files[0] is 1"),
    ('{"files": "ab"}', "files is 'ab'"),
    ('{"files": [{"path": 3, "bits_per_byte": 1.0}]}', "files[0].path is 3"),
    ('{"val": {"by_source": {"a": 3}}}', "val.by_source.a is 3"),
])
def test_eval_compare_of_a_malformed_result_is_one_line(tmp_path, text, fragment):
    (tmp_path / "good.json").write_text(json.dumps(GOOD_RESULT))
    (tmp_path / "bad.json").write_text(text)
    r = cli("eval", "--compare", "good.json", "bad.json", cwd=tmp_path)
    assert_user_error(r, "eval", "bad.json is not", fragment, "re-run `antimatter eval --run")


def test_eval_compare_of_well_formed_results_unchanged(tmp_path):
    (tmp_path / "good.json").write_text(json.dumps(GOOD_RESULT))
    r = cli("eval", "--compare", "good.json", "good.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "148.40" in r.stdout and "val a bits/byte" in r.stdout and "x.txt bits/byte" in r.stdout


def test_a_key_written_twice_in_a_config_is_refused(tmp_path):
    """YAML keeps the last of two equal keys without a word: `lr: 1` then `lr: 2` is a mistake to name."""
    (tmp_path / "twice.yaml").write_text("name: x\ntrain:\n  lr: 0.001\n  seed: 3\n  lr: 0.002\n")
    r = cli("info", "--config", "twice.yaml", cwd=tmp_path)
    assert_user_error(r, "info", "config file twice.yaml: 'lr' is written twice in one section (again at line 5)")
