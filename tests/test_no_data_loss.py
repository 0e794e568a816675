"""What a stage may delete: only what it wrote itself. Output folders that overlap the inputs, run names that
leave runs_dir and folders holding the user's files are refused with one line, and nothing is deleted."""

from __future__ import annotations

import json
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
    for out in (corpus, corpus / "prepared"):
        r = cli("prepare", str(corpus), "--out", str(out), cwd=tmp_path)
        assert_user_error(r, "prepare", "overlaps the input", "nothing was deleted")
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
