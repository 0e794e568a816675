"""What a stage may delete: only what it wrote itself. Output folders that overlap the inputs, run names that
leave runs_dir and folders holding the user's files are refused with one line, and nothing is deleted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import zstandard
from test_cli import assert_user_error, cli


def write_corpus(folder: Path, n: int = 30) -> list[Path]:
    """A few JSONL.zst files of plain English documents (enough words to pass the quality rules)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for part in range(2):
        docs = [{"text": f"Document {part}-{i} tells a short story about the river, the town and the people "
                         f"who lived there. They worked, they talked and they walked along the water. "
                         f"Number {i * 7 + part} is written here so that every document differs."}
                for i in range(n)]
        f = folder / f"part-{part}.jsonl.zst"
        f.write_bytes(zstandard.ZstdCompressor().compress("".join(json.dumps(d) + "\n" for d in docs).encode()))
        files.append(f)
    return files


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_prepare_out_overlapping_the_input_is_refused(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    (corpus / "train").mkdir()  # the names prepare writes, holding the user's own files
    write_corpus(corpus / "train")
    before = snapshot(corpus)
    for out in (corpus, corpus / "prepared", Path("/")):
        r = cli("prepare", str(corpus), "--out", str(out), cwd=tmp_path)
        # the folder it suggests is beside the input: neither inside it nor holding it
        assert_user_error(r, "prepare", "overlaps the input", "(e.g. --out corpus-prepared); nothing was deleted")
        assert snapshot(corpus) == before
    r = cli("prepare", str(corpus / "part-0.jsonl.zst"), "--out", str(corpus), cwd=tmp_path)
    assert_user_error(r, "prepare", "overlaps the input")
    assert snapshot(corpus) == before


def test_prepare_out_holding_other_files_is_refused_but_its_own_output_is_redone(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    mine = tmp_path / "mine"
    (mine / "train").mkdir(parents=True)
    (mine / "train" / "notes.jsonl.zst").write_bytes(b"the user's file")
    (mine / "dataset_statistics.json").write_text("{}")
    before = snapshot(mine)
    r = cli("prepare", str(corpus), "--out", str(mine), cwd=tmp_path)
    assert_user_error(r, "prepare", "did not write", "nothing was deleted")
    assert snapshot(mine) == before
    out = tmp_path / "out"  # a new folder: prepared, then prepared again (its own output may be replaced)
    for _ in range(2):
        r = cli("prepare", str(corpus), "--out", str(out), "data.val_fraction=0.2", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        manifest = json.loads((out / "manifest.json").read_text())
        assert all((out / rel).is_file() for rel in manifest["outputs"])  # lists only what is there


def test_run_names_stay_inside_runs_dir(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    victim = tmp_path / "victim" / "data"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("precious")
    for name in ("../victim", "a/b", ".."):
        r = cli("prepare", str(corpus), "--name", name, "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
        assert_user_error(r, "prepare", "must be one plain folder name")
    assert (victim / "keep.txt").read_text() == "precious"


def test_a_stage_never_clears_a_folder_it_did_not_write(tmp_path):
    """A user's file in runs/exp/data survives `prepare --name exp`; a folder the stage wrote (even one left
    half-written by a kill: its mark is written first) is replaced."""
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    data = tmp_path / "runs" / "exp" / "data"
    data.mkdir(parents=True)
    (data / "keep.txt").write_text("precious")
    args = ("prepare", str(corpus), "--name", "exp", "--runs-dir", str(tmp_path / "runs"), "data.val_fraction=0.2")
    r = cli(*args, cwd=tmp_path)
    assert_user_error(r, "prepare", "did not write", "--name", "nothing was deleted")
    assert (data / "keep.txt").read_text() == "precious"
    (data / "keep.txt").unlink()
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (data / "manifest.json").unlink()  # as if killed before the end: the mark still says whose folder it is
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (data / "manifest.json").is_file()


def test_overrides_after_an_option_that_follows_paths(tmp_path):
    """`prepare PATH --out DIR KEY=VALUE`: the override is applied, not refused."""
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    r = cli("prepare", str(corpus), "--out", str(tmp_path / "o"), "data.val_fraction=0.5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["config"]["val_fraction"] == 0.5
    r = cli("prepare", str(corpus), "--out", str(tmp_path / "p"), "--bogus", cwd=tmp_path)
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr


def test_a_truncated_zst_input_is_an_error_and_every_frame_is_read(tmp_path):
    """python-zstandard's stream reader ends cleanly at a cut, so half a file read as a shorter corpus; and it
    stopped after the first frame of a multi-frame file. Both now read right: a cut is a one-line error."""
    import io

    from antimatter.files import open_zstd

    data = b"".join(f'{{"text": "line {i} of a file with several frames"}}\n'.encode() for i in range(20_000))
    frames = zstandard.ZstdCompressor().compress(data[:300_000]) + zstandard.ZstdCompressor().compress(data[300_000:])
    assert open_zstd(io.BytesIO(frames), "f.zst").read() == data
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    whole = (corpus / "part-1.jsonl.zst").read_bytes()
    (corpus / "part-1.jsonl.zst").write_bytes(whole[: len(whole) * 6 // 10])
    r = cli("prepare", str(corpus), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert_user_error(r, "prepare", "part-1.jsonl.zst is truncated")


def test_a_fifo_in_an_input_folder_is_skipped_not_read(tmp_path):
    """Reading a FIFO blocks forever: prepare skips entries that are not regular files, and says so."""
    import os

    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    os.mkfifo(corpus / "pipe.txt")
    (corpus / "dangling.txt").symlink_to(tmp_path / "nowhere")
    r = cli("prepare", str(corpus), "--out", str(tmp_path / "out"), "data.val_fraction=0.2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "skipped 2 entries" in r.stderr and "not regular files" in r.stderr


def test_config_bombs_and_bad_sizes_are_refused_in_one_short_line(tmp_path):
    """A 369-byte YAML alias bomb expanded to a gigabyte (and a 351 MB error line); shard_tokens=0 made empty
    shards until the disk filled."""
    bomb = tmp_path / "bomb.yaml"
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]")
    lines.append("train: {lr: *i}")
    bomb.write_text("\n".join(lines) + "\n")
    r = cli("info", "--config", str(bomb), cwd=tmp_path)
    line = assert_user_error(r, "info", "YAML aliases", "not allowed")
    assert len(line) < 300
    r = cli("tokenize", "tokenize.shard_tokens=0", cwd=tmp_path)
    assert_user_error(r, "tokenize", "tokenize.shard_tokens", "must be positive")
    r = cli("train", f"train.lr={'9' * 5000}x", cwd=tmp_path)
    line = assert_user_error(r, "train", "train.lr: expected a number")
    assert len(line) < 300


def test_io_errors_end_in_one_line_not_a_traceback(tmp_path):
    """An OSError (here a name too long for the file system, from an argument read as a path) is one line
    naming the problem, exit 1; ANTIMATTER_DEBUG=1 shows the traceback."""
    r = cli("info", f"{'9' * 5000}", cwd=tmp_path)  # quoted short
    line = assert_user_error(r, "info", "unexpected argument")
    assert len(line) < 300
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    (tmp_path / "a-file").write_text("x")
    r = cli("prepare", str(corpus), "--out", str(tmp_path / "a-file" / "out"), cwd=tmp_path)
    assert "Traceback" not in r.stderr and r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("antimatter prepare: error: Not a directory") and "a-file" in lines[-1]
    r = cli("prepare", str(corpus), "--out", str(tmp_path / "a-file" / "out"), cwd=tmp_path,
            env_extra={"ANTIMATTER_DEBUG": "1"})
    assert "Traceback" in r.stderr and "NotADirectoryError" in r.stderr


def test_a_missing_dependency_is_one_line_naming_the_pip_package(tmp_path):
    """A dependency absent from the Python that runs the command (a GPU image without rouge-score) is one
    line saying what to install, exit 1, not an ImportError traceback."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['rouge_score'] = None\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r = cli("eval", "--run", str(tmp_path / "no-run"), cwd=tmp_path, env_extra=env)
    assert "Traceback" not in r.stderr and r.returncode == 1, r.stderr
    line = [ln for ln in r.stderr.splitlines() if ln.strip()][-1]
    assert line.startswith("antimatter eval: error: the Python package 'rouge_score' is missing"), line
    assert "pip install rouge-score" in line


def test_a_stage_that_fails_leaves_its_earlier_output_as_it_was(tmp_path):
    """Each data stage builds beside its folder and swaps at the end: a second run that fails (nothing
    survives cleaning; a tokenizer.from that is not a tokenizer) leaves the first run's output whole, and the
    next stage still runs on it. The same for `prepare --out`."""
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    runs = ("--runs-dir", str(tmp_path / "runs"), "--name", "exp")
    assert cli("prepare", str(corpus), *runs, "data.val_fraction=0.2", cwd=tmp_path).returncode == 0
    assert cli("tokenizer", *runs, "tokenizer.vocab_size=300", cwd=tmp_path).returncode == 0
    run = tmp_path / "runs" / "exp"
    data, tokenizer = snapshot(run / "data"), snapshot(run / "tokenizer")
    r = cli("prepare", str(empty), *runs, "data.val_fraction=0.2", cwd=tmp_path)
    assert_user_error(r, "prepare", "no document")
    not_json = tmp_path / "notes.json"
    not_json.write_text('{"a": 1}\n{"b": 2}\n')
    r = cli("tokenizer", *runs, f"tokenizer.from={not_json}", cwd=tmp_path)
    assert_user_error(r, "tokenizer", "not a tokenizer.json")
    assert snapshot(run / "data") == data and snapshot(run / "tokenizer") == tokenizer
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "data", "tokenizer", "train.lock"]  # no scratch
    r = cli("tokenize", *runs, "tokenizer.vocab_size=300", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "prepared"
    assert cli("prepare", str(corpus), "--out", str(out), "data.val_fraction=0.2", cwd=tmp_path).returncode == 0
    before = snapshot(out)
    assert_user_error(cli("prepare", str(empty), "--out", str(out), cwd=tmp_path), "prepare", "no document")
    assert snapshot(out) == before


def test_a_users_file_in_a_finished_stage_folder_is_not_deleted_by_force(tmp_path):
    """A file the manifest does not list is the user's: `--force` refuses, names it and deletes nothing."""
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    runs = ("--runs-dir", str(tmp_path / "runs"), "--name", "exp")
    assert cli("prepare", str(corpus), *runs, "data.val_fraction=0.2", cwd=tmp_path).returncode == 0
    notes = tmp_path / "runs" / "exp" / "data" / "train" / "my-notes.txt"
    notes.write_text("precious")
    r = cli("prepare", str(corpus), *runs, "data.val_fraction=0.2", "--force", cwd=tmp_path)
    assert_user_error(r, "prepare", "did not write", "train/my-notes.txt", "nothing was deleted")
    assert notes.read_text() == "precious"


def test_a_source_path_under_the_home_folder(tmp_path):
    """`path: ~/corpus` in a config is read from the home folder, as the CLI's paths are, not refused as missing."""
    write_corpus(tmp_path / "corpus")
    (tmp_path / "c.yaml").write_text("data:\n  val_fraction: 0.2\n  sources:\n    - path: ~/corpus\n")
    r = cli("prepare", "-c", "c.yaml", "--runs-dir", "runs", cwd=tmp_path, env_extra={"HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "kept 60 of 60 documents" in r.stdout + r.stderr


def test_a_linked_folder_in_an_input_folder_is_read_once(tmp_path):
    """A link to a folder is followed (it was silently left out); a link loop and a second path to a folder
    already read add nothing."""
    corpus = tmp_path / "corpus"
    write_corpus(corpus / "own")
    more = tmp_path / "elsewhere" / "more"
    more.mkdir(parents=True)
    for i in range(20):
        (more / f"note-{i}.txt").write_text(f"Note {i} is kept somewhere else. It tells of the harbour, the boats "
                                            f"and the people who fished there, and of the year {1900 + i}.\n")
    (corpus / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (corpus / "own" / "loop").symlink_to(corpus, target_is_directory=True)
    (corpus / "again").symlink_to(corpus / "own", target_is_directory=True)
    r = cli("prepare", str(corpus), "--out", str(tmp_path / "out"), "data.val_fraction=0.2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert " of 80 documents" in r.stdout + r.stderr  # 60 + 20, each once (one near-duplicate note may go)
    runs = ("--runs-dir", str(tmp_path / "runs"), "--name", "exp", "data.val_fraction=0.2")
    assert cli("prepare", str(corpus), *runs, cwd=tmp_path).returncode == 0
    assert "up to date" in cli("prepare", str(corpus), *runs, cwd=tmp_path).stderr
    (more / "note-3.txt").write_text("Note 3 was rewritten: the harbour froze that winter and nobody fished.\n")
    r = cli("prepare", str(corpus), *runs, cwd=tmp_path)  # a change behind the link is a change of the input
    assert r.returncode == 0 and "up to date" not in r.stderr, r.stderr


def test_an_unreadable_folder_inside_an_input_is_an_error(tmp_path):
    """Left out without a word before. Root reads every folder, so this runs as another user only."""
    if os.geteuid() == 0:
        import pytest

        pytest.skip("root can read a folder without read permission")
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    write_corpus(corpus / "locked")
    (corpus / "locked").chmod(0)
    try:
        r = cli("prepare", str(corpus), "--out", str(tmp_path / "out"), cwd=tmp_path)
        assert_user_error(r, "prepare", f"cannot read the folder {corpus / 'locked'}", "make it readable")
    finally:
        (corpus / "locked").chmod(0o755)


def test_the_users_own_config_in_the_run_folder_is_kept(tmp_path):
    """`-c runs/exp/config.yaml` with the user's comments: the run's resolved settings are written there, and
    the user's file is kept beside it, not overwritten. A file antimatter wrote is rewritten in place."""
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    mine = tmp_path / "runs" / "exp" / "config.yaml"
    mine.parent.mkdir(parents=True)
    text = f"# my notes on this run\nname: exp\ndata:\n  val_fraction: 0.2  # more val\n  sources:\n    - path: {corpus}\n"
    mine.write_text(text)
    r = cli("prepare", "-c", str(mine), "--runs-dir", str(tmp_path / "runs"), "data.seed=7", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "was not written by antimatter: kept as" in r.stderr
    assert (mine.parent / "config.yaml.orig").read_text() == text
    saved = mine.read_text()
    assert saved.startswith("# antimatter:") and "seed: 7" in saved
    assert cli("prepare", "-c", str(mine), "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path).returncode == 0
    assert sorted(p.name for p in mine.parent.glob("config.yaml*")) == ["config.yaml", "config.yaml.orig"]
    mine.write_text(saved.split("\n", 1)[1])  # as written before the header line: rewritten, not kept aside
    r = cli("prepare", "-c", str(mine), "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert r.returncode == 0 and "not written by antimatter" not in r.stderr, r.stderr
    assert mine.read_text().startswith("# antimatter:") and not (mine.parent / "config.yaml.orig2").exists()


def test_a_file_where_a_folder_belongs_is_named_as_a_file(tmp_path):
    """--out naming a file and --config naming a folder: each said for what it is, and nothing is touched."""
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    (tmp_path / "out.txt").write_text("mine")
    r = cli("prepare", str(corpus), "--out", str(tmp_path / "out.txt"), cwd=tmp_path)
    assert_user_error(r, "prepare", "--out", "out.txt is a file: give a folder", "nothing was deleted")
    assert (tmp_path / "out.txt").read_text() == "mine"
    r = cli("prepare", str(corpus), "--config", str(corpus), cwd=tmp_path)
    assert_user_error(r, "prepare", f"--config {corpus} is a folder: give the YAML file")


def test_a_data_stage_waits_for_no_training_of_its_run(tmp_path):
    """While a process holds the run (a training), the data stages refuse instead of replacing the files
    it reads; after it, they run."""
    from antimatter.files import exclusive_lock

    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    runs = ("--runs-dir", str(tmp_path / "runs"), "--name", "exp", "data.val_fraction=0.2")
    run = tmp_path / "runs" / "exp"
    with exclusive_lock(run / "train.lock", "a training"):
        r = cli("prepare", str(corpus), *runs, cwd=tmp_path)
        assert_user_error(r, "prepare", f"run {run} is in use by pid {os.getpid()}")
        assert not (run / "data").exists()
    assert cli("prepare", str(corpus), *runs, cwd=tmp_path).returncode == 0
