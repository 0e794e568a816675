"""Faults: files cut at any byte and a disk that fills up. Each consumer either reads the whole file or
refuses it with one line; a full disk ends a command with one line and leaves what was there before intact
(docs/ARCHITECTURE.md, "Under faults")."""

from __future__ import annotations

import io
import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from train_helpers import cli_env, make_tokens, one_thread, tiny_config, write_config

from antimatter import checkpoint as ck
from antimatter.config import RunConfig, SourceConfig
from antimatter.data.sample import SENTENCES, write_sample_corpus
from antimatter.errors import UserError
from antimatter.files import open_zstd
from antimatter.pipeline import run_stage
from antimatter.train.trainer import train

assert one_thread  # the autouse fixture, imported so pytest uses it here

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def three_frames() -> tuple[bytes, list[int], bytes]:
    """A .zst stream of three frames (as appending writers make), the offsets where frames end, the text."""
    parts = [(" ".join(SENTENCES[i: i + 12]) + "\n").encode() for i in (0, 10, 20)]
    frames = [zstandard.ZstdCompressor().compress(p) for p in parts]
    ends = [sum(len(f) for f in frames[: i + 1]) for i in range(3)]
    return b"".join(frames), ends, b"".join(parts)


@FAST
@given(data=st.data())
def test_a_zstd_stream_cut_anywhere_is_refused_or_whole_frames(data):
    """Cut inside a frame: refused as truncated. Cut exactly where a frame ends: the complete frames before it
    (a zstd stream cannot tell; the stage manifests' sizes catch that case, see the next test)."""
    blob, ends, text = three_frames()
    cut = data.draw(st.integers(1, len(blob) - 1))
    reader = open_zstd(io.BytesIO(blob[:cut]), "cut.zst")
    if cut in ends:
        assert text.startswith(reader.read())
    else:
        with pytest.raises(UserError, match=r"cut\.zst is truncated"):
            reader.read()


@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory) -> Path:
    """A run folder whose data/ was written by `prepare` (with its manifest)."""
    root = tmp_path_factory.mktemp("faults")
    cfg = RunConfig()
    cfg.name, cfg.runs_dir = "run", str(root)
    cfg.data.sources = [SourceConfig(path=str(write_sample_corpus(root / "corpus", n_prose=40)))]
    cfg.data.workers = 1
    run_stage("prepare", cfg)
    return root / "run"


@FAST
@given(data=st.data())
def test_prepared_data_cut_anywhere_is_refused_before_the_tokenizer_reads_it(prepared_run, tmp_path_factory, data):
    """Whatever byte a prepared data file is cut at (frame boundaries included), the next stage refuses the
    folder with one line naming the file and the command that writes it again; the file is left as it is."""
    run = tmp_path_factory.mktemp("cut") / "run"
    shutil.copytree(prepared_run, run)
    shard = sorted((run / "data" / "train").glob("*.jsonl.zst"))[0]
    blob = shard.read_bytes()
    cut = data.draw(st.integers(0, len(blob) - 1))
    shard.write_bytes(blob[:cut])
    cfg = RunConfig()
    cfg.name, cfg.runs_dir = "run", str(run.parent)
    with pytest.raises(UserError) as e:
        run_stage("tokenizer", cfg)
    msg = str(e.value)
    assert shard.name in msg and "antimatter prepare --force" in msg and "\n" not in msg
    assert shard.read_bytes() == blob[:cut] and not (run / "tokenizer").exists()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run = make_tokens(tmp_path_factory.mktemp("ckpt") / "run")
    train(tiny_config(run, max_steps=4, ckpt_interval=4, eval_interval=0), run)
    return run


@FAST
@given(data=st.data())
def test_checkpoint_weights_cut_anywhere_are_refused(trained_run, tmp_path_factory, data):
    """A checkpoint's weights cut at any byte never load: the checkpoint names itself as damaged."""
    run = tmp_path_factory.mktemp("cutckpt") / "run"
    shutil.copytree(trained_run, run)
    weights = run / "checkpoints" / "step_000004" / "model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: data.draw(st.integers(0, len(blob) - 1))])
    with pytest.raises(ck.CheckpointError, match=r"model\.safetensors"):
        ck.load_model(run, "latest")


def run_with_file_size_limit(cmd: list[str], limit: int, cwd: Path) -> subprocess.CompletedProcess:
    """`cmd` where no file may grow past `limit` bytes: a write beyond it fails with EFBIG, as on a full disk
    (SIGXFSZ ignored, so the process sees the error instead of being killed)."""

    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(cmd, cwd=cwd, env=cli_env(), preexec_fn=limit_files, capture_output=True, text=True,
                          timeout=180)


def one_error_line(r: subprocess.CompletedProcess, cmd: str) -> str:
    assert "Traceback" not in r.stderr + r.stdout and r.returncode == 1, r.stderr[-2000:]
    line = [ln for ln in r.stderr.splitlines() if ln.strip()][-1]
    assert line.startswith(f"antimatter {cmd}: error: "), line
    return line


def test_a_full_disk_during_a_checkpoint_keeps_the_last_good_one(tmp_path):
    """The disk fills while step 8's checkpoint is written: one line, exit 1, and step 4's checkpoint is
    still `latest` and loads."""
    run = make_tokens(tmp_path / "run")
    train(tiny_config(run, max_steps=4, ckpt_interval=4, eval_interval=0), run)
    weights = run / "checkpoints" / "step_000004" / "model.safetensors"
    before = weights.read_bytes()
    cfg = write_config(run, tiny_config(run, max_steps=8, ckpt_interval=4, eval_interval=0))
    r = run_with_file_size_limit([sys.executable, "-m", "antimatter.cli", "train", "--config", str(cfg)],
                                 len(before) // 2, tmp_path)
    line = one_error_line(r, "train")
    assert "too large" in line.lower() or "no space" in line.lower(), line
    assert ck.read_pointer(run / "checkpoints", "latest") == "step_000004"
    assert weights.read_bytes() == before
    model, _, where = ck.load_model(run, "latest")
    assert where.name == "step_000004"


def test_a_full_disk_during_prepare_is_one_line_and_the_input_is_untouched(tmp_path):
    corpus = write_sample_corpus(tmp_path / "corpus", n_prose=40)
    before = {p: p.read_bytes() for p in sorted(corpus.rglob("*")) if p.is_file()}
    r = run_with_file_size_limit([sys.executable, "-m", "antimatter.cli", "prepare", str(corpus), "--out",
                                  str(tmp_path / "out"), "data.workers=1"], 1500, tmp_path)
    one_error_line(r, "prepare")
    assert {p: p.read_bytes() for p in sorted(corpus.rglob("*")) if p.is_file()} == before
    assert not (tmp_path / "out" / "manifest.json").exists()  # a half-written stage never looks finished


def test_flipped_bytes_in_prepared_data_are_one_line(prepared_run, tmp_path):
    """Same size, other bytes (a bad disk block): the manifest's sizes agree, the zstd decoder does not, and
    that is one line naming the fault, not the decoder's traceback."""
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    shard = sorted((run / "data" / "train").glob("*.jsonl.zst"))[0]
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2: len(blob) // 2 + 64] = bytes(64)
    shard.write_bytes(bytes(blob))
    r = subprocess.run([sys.executable, "-m", "antimatter.cli", "tokenizer", "--name", "run", "--runs-dir",
                        str(tmp_path), "tokenizer.vocab_size=300"], cwd=tmp_path, env=cli_env(),
                       capture_output=True, text=True, timeout=120)
    line = one_error_line(r, "tokenizer")
    assert "Zstd" in line or "corrupt" in line, line


def test_a_hand_edited_output_size_is_refused_in_one_line(prepared_run, tmp_path):
    """A manifest whose listed size is not a number (edited by hand) is refused like a changed file."""
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    manifest = run / "data" / "manifest.json"
    m = json.loads(manifest.read_text())
    first = next(iter(m["outputs"]))
    m["outputs"][first] = "abc"
    manifest.write_text(json.dumps(m))
    cfg = RunConfig()
    cfg.name, cfg.runs_dir = "run", str(tmp_path)
    with pytest.raises(UserError, match=r"manifest says 'abc': .*antimatter prepare --force"):
        run_stage("tokenizer", cfg)
