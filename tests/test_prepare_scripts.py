"""`run_prepare` with worker processes, called from a user's plain Python script (no
`if __name__ == "__main__":` guard) or from a script piped on stdin: it finishes with the same output as
one process, and a worker that dies ends the run with one line instead of hanging. Real subprocesses, a
tiny corpus written here, no mocks."""

from __future__ import annotations

import io
import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import zstandard

from antimatter.config import RunConfig
from antimatter.data.prepare import run_prepare
from antimatter.data.sample import write_sample_corpus
from antimatter.data.sources import sources_from_paths
from antimatter.errors import UserError

SRC = str(Path(__file__).resolve().parents[1] / "src")
TIMEOUT_S = 120

PLAIN_SCRIPT = """\
from antimatter.config import load_config
from antimatter.data.prepare import run_prepare
from antimatter.data.sources import sources_from_paths
from antimatter.errors import UserError

cfg = load_config(None, ["data.workers=2", "data.val_fraction=0.2"])
cfg.data.sources = sources_from_paths([{corpus!r}])
run_prepare(cfg, {out!r})
print("prepared")
"""


def shards(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): zstandard.ZstdDecompressor().stream_reader(io.BytesIO(p.read_bytes())).read()
            for p in sorted(out.rglob("*.jsonl.zst"))}


def run_python(args: list[str], cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, input=stdin, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def corpus_and_reference(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """The tiny corpus and the shards one process makes of it."""
    corpus = write_sample_corpus(tmp_path_factory.mktemp("corpus"), n_prose=12)
    cfg = RunConfig()
    cfg.data.sources = sources_from_paths([str(corpus)])
    cfg.data.workers = 1
    cfg.data.val_fraction = 0.2
    ref = tmp_path_factory.mktemp("ref")
    run_prepare(cfg, ref)
    return corpus, shards(ref)


@pytest.mark.parametrize("how", ["file", "stdin"])
def test_a_plain_script_without_a_main_guard_prepares_with_workers(corpus_and_reference, tmp_path, how):
    """Spawned workers used to run the unguarded script again (or fail to find `<stdin>`), die at start and
    be replaced forever: the script hung. Now it finishes, with the output of one process."""
    corpus, reference = corpus_and_reference
    out = tmp_path / "out" / "data"
    script = PLAIN_SCRIPT.format(corpus=str(corpus), out=str(out))
    if how == "file":
        (tmp_path / "prep.py").write_text(script)
        r = run_python(["prep.py"], tmp_path)
    else:
        r = run_python(["-"], tmp_path, stdin=script)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and r.stdout.rstrip().endswith("prepared")
    assert "(2 workers)" in r.stdout
    assert shards(out) == reference
    assert not (out / ".prepare-tmp").exists()


def test_a_worker_that_dies_ends_prepare_with_one_line(corpus_and_reference, tmp_path):
    """A worker process that dies (here at start, as the out-of-memory killer would at any point) is not
    replaced over and over: prepare stops at once with one line that says what happened and what to do."""
    corpus, _ = corpus_and_reference
    script = textwrap.dedent(f"""\
        import os
        import sys

        from antimatter.config import load_config
        from antimatter.data.prepare import run_prepare
        from antimatter.data.sources import sources_from_paths
        from antimatter.errors import UserError


        class DiesInTheWorker:
            def __reduce__(self):
                return (os._exit, (3,))


        cfg = load_config(None, ["data.workers=2"])
        cfg.data.sources = sources_from_paths([{str(corpus)!r}])
        cfg.data.dies_in_the_worker = DiesInTheWorker()  # travels to each worker with the data config
        try:
            run_prepare(cfg, {str(tmp_path / "out")!r})
        except UserError as e:
            print(f"error: {{e}}", file=sys.stderr)
            sys.exit(2)
        """)
    (tmp_path / "prep.py").write_text(script)
    r = run_python(["prep.py"], tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: a prepare worker process stopped (exit code 3) while reading "), last
    assert "data.workers" in last
    assert not (tmp_path / "out" / ".prepare-tmp").exists()


def test_a_worker_error_is_raised_in_the_main_process(corpus_and_reference, tmp_path):
    """An error in a worker (here a malformed line under data.strict) is raised by `run_prepare` as it was
    raised in the worker, with the file named, and the workers and temporary files are gone."""
    corpus, _ = corpus_and_reference
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a fine document of several words"}\n{broken\n')
    cfg = RunConfig()
    cfg.data.sources = sources_from_paths([str(corpus / "books"), str(bad)])
    cfg.data.workers = 2
    cfg.data.strict = True
    with pytest.raises(UserError, match=r"bad\.jsonl:2: malformed JSON"):
        run_prepare(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / ".prepare-tmp").exists()
    assert not [p for p in multiprocessing.active_children() if p.name == "antimatter-prepare"]
