"""The Python API's model, `antimatter.LLM`, on a real tiny run: generate (seeds, timing split at the first
token), score (the figures of `antimatter eval --data`), export and loading the export back, what the model's
context did in words, bad input as one line; and the same calls from a plain script and a notebook kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import antimatter
from antimatter.config import ConfigError, load_config
from antimatter.errors import UserError
from antimatter.eval.report import score_data_files
from antimatter.llm import LLM, context_note

TEXT = "Return a new list containing all items from the iterable in ascending order."


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run (stdlib docstrings -> BPE -> tokens -> the tiny model, context 64, trained 20 steps)."""
    from test_eval import build_tiny_run

    return build_tiny_run(tmp_path_factory.mktemp("llm"), steps=20)


@pytest.fixture(scope="module")
def llm(tiny_run: Path) -> LLM:
    return antimatter.LLM.load(tiny_run, device="cpu")


def test_a_seed_repeats_a_sample_and_none_draws_one(llm):
    a = llm.generate("The ", max_new_tokens=12, seed=3)
    assert llm.last.seed == 3 and llm.generate("The ", max_new_tokens=12, seed=3) == a
    drawn = [llm.complete("The ", llm.sampling(max_new_tokens=4)).seed for _ in range(3)]
    assert None not in drawn and len(set(drawn)) == 3  # a new seed per sample, kept to repeat it
    assert llm.generate("The ", 6, temperature=0.0) == llm.generate("The ", 6, temperature=0.0)
    assert llm.last.seed is None  # greedy: nothing drawn
    assert llm.settings.seed is None and llm.settings.max_new_tokens == 64  # the run's generate: section


def test_the_rate_leaves_out_the_first_token(llm, monkeypatch):
    """first_token_s is the prompt, the prefill and the first step; tokens_per_s the tokens after it over the
    time after it. A clock that makes the first token take 10 s and each later one 1 s shows the split."""
    import antimatter.llm as llm_module

    ticks = iter([0.0, *(10.0 + i for i in range(100))])

    class Clock:
        @staticmethod
        def perf_counter() -> float:
            return next(ticks)

    monkeypatch.setattr(llm_module, "time", Clock)
    r = llm.complete("The ", llm.sampling(max_new_tokens=8, temperature=0.0))
    monkeypatch.undo()
    steps = r.new_tokens + (r.new_tokens < 8)  # a step streamed the EOT when it ended early
    assert r.first_token_s == 10.0 and r.tokens_per_s == pytest.approx(1.0)
    assert r.seconds == 10.0 + steps and r.threads == 1


def test_score_is_what_eval_data_reports(llm, tiny_run, tmp_path):
    """The same text as a .txt file through `antimatter eval --data`'s code: the same figures."""
    scored = llm.score(TEXT)
    assert set(scored) == {"loss", "perplexity", "bits_per_byte", "tokens"}
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    cfg = load_config(tiny_run / "config.yaml", ["eval.device=cpu"])
    (f,) = score_data_files(cfg, tiny_run, [str(path)])["files"]
    assert scored["tokens"] == f["tokens"] and scored["loss"] == pytest.approx(f["loss"], rel=1e-6)
    assert scored["bits_per_byte"] == pytest.approx(f["bits_per_byte"], rel=1e-6)


def test_export_and_load_the_hugging_face_folder(llm, tmp_path):
    """`.export` writes `antimatter export`'s folder; `LLM.load` reads it back: the same greedy text and score."""
    out = llm.export(tmp_path / "hf")
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    hf = antimatter.LLM.load(out, device="cpu")
    assert hf.checkpoint is None and hf.source == out
    assert hf.generate("def ", 10, temperature=0.0) == llm.generate("def ", 10, temperature=0.0)
    assert hf.score(TEXT)["loss"] == pytest.approx(llm.score(TEXT)["loss"], rel=1e-5)
    again = hf.export(tmp_path / "hf2", dtype="bf16")  # from a Hugging Face folder too
    assert json.loads((again / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_what_the_context_did_in_words():
    """Context 64: below it a long prompt is cut, at or past it the window slides (32 kept, 32 new a round)."""
    assert context_note(10, 20, 20, 64) is None
    assert context_note(50, 20, 20, 64) == ("the model's context is 64 tokens: the prompt was cut to its last 44 to "
                                            "leave room for 20 new ones")
    assert context_note(10, 100, 30, 64) is None  # ended (EOT) before the window had to slide
    assert context_note(10, 100, 100, 64) == ("the model's context is 64 tokens: the window slid, re-reading the "
                                              "last 32 tokens every 32 new ones")
    assert context_note(40, 64, 20, 64) == "the model's context is 64 tokens: the prompt was cut to its last 32 tokens"


def test_bad_input_is_one_line(llm, tiny_run, tmp_path):
    with pytest.raises(UserError, match=r"^.*missing does not exist: give a run folder \(e.g. runs/quickstart\), one "
                                        r"of its checkpoint folders, or a Hugging Face model folder$"):
        antimatter.LLM.load(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"^top_k must be >= 0 \(0 = off\), got -1$"):
        llm.generate("The ", top_k=-1)
    with pytest.raises(ConfigError, match=r"^device 'banana' is not a device"):
        antimatter.LLM.load(tiny_run, device="banana")
    with pytest.raises(UserError, match=r"^score: the text is empty: give some text to score$"):
        llm.score("  \n")


def _child_env() -> dict[str, str]:
    """A child Python imports this checkout's antimatter, on one thread (tiny model, shared cores)."""
    src = str(Path(antimatter.__file__).parents[1])
    return {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}


SCRIPT = """
import json, sys
import antimatter

cheap = "torch" not in sys.modules  # `import antimatter` alone loads no torch
llm = antimatter.LLM.load(sys.argv[1], device="cpu")
print(json.dumps({"cheap": cheap, "text": llm.generate("The ", max_new_tokens=12, seed=7),
                  "score": llm.score(sys.argv[2]), "repr": repr(llm)}))
"""


def test_from_a_plain_script(llm, tiny_run, tmp_path):
    """`python script.py`: what a user's own script sees, the same text and score as here."""
    (tmp_path / "script.py").write_text(SCRIPT)
    r = subprocess.run([sys.executable, "script.py", str(tiny_run), TEXT], cwd=tmp_path, env={**os.environ, **_child_env()},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["cheap"] and got["text"] == llm.generate("The ", max_new_tokens=12, seed=7)
    assert got["score"]["loss"] == pytest.approx(llm.score(TEXT)["loss"], rel=1e-6)
    assert got["repr"].startswith(f"LLM({tiny_run}/checkpoints/step_000020, ") and got["repr"].endswith("on cpu)")


def test_from_a_notebook_kernel(llm, tiny_run, tmp_path, monkeypatch):
    """A small notebook executed by a real kernel (nbclient + ipykernel), as in Jupyter."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    cells = ["import antimatter",
             f"llm = antimatter.LLM.load({str(tiny_run)!r}, device='cpu')\nllm",
             "print(llm.generate('The ', max_new_tokens=12, seed=7))",
             f"llm.score({TEXT!r})"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(textwrap.dedent(c)) for c in cells])
    for key, value in _child_env().items():  # the kernel is a child process of this one
        monkeypatch.setenv(key, value)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                            ).execute()
    shown, printed, scored = ([o for o in c.outputs if o.output_type in ("execute_result", "stream")]
                              for c in nb.cells[1:])
    assert [o.output_type for o in shown + printed + scored] == ["execute_result", "stream", "execute_result"]
    assert shown[0]["data"]["text/plain"].startswith("LLM(")
    assert printed[0]["text"] == llm.generate("The ", max_new_tokens=12, seed=7) + "\n"  # print's newline
    assert "'perplexity'" in scored[0]["data"]["text/plain"]
