"""`antimatter generate` as a user meets it (a subprocess on a real tiny run): the line after an answer splits
the first token (the prefill) from the rate after it and names the seed that repeats the sample; a session
draws a new seed per sample unless one is set; past the model's context the window slides and the line says
so; a small model decodes on one CPU thread unless --threads says otherwise."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_bad_values import cli_stdin
from test_cli import cli

# the line after an answer (one token or none: no rate after the first)
STATS = re.compile(r"\[(?P<tokens>\d+) tokens?(?:: first after \d+ ms, then [\d.]+ tokens/s| in \d+ ms) on cpu, "
                   r"(?P<threads>\d+) threads?(?:; seed (?P<seed>\d+) \((?:--|/)seed (?P=seed) repeats this sample\))?\]")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run (stdlib docstrings -> BPE -> tokens -> the tiny model, context 64, trained 20 steps)."""
    from test_eval import build_tiny_run

    return build_tiny_run(tmp_path_factory.mktemp("generate_cli"), steps=20)


def test_one_shot_names_its_seed_and_that_seed_repeats_it(tiny_run):
    """No --seed: a seed is drawn and printed; given back with --seed it gives the same text. The rate is
    the tokens after the first one; the first token's time (prefill) is said on its own. With two torch
    threads the tiny model still decodes on one (auto)."""
    args = ("generate", "--run", str(tiny_run), "--prompt", "The ", "--max-new-tokens", "12")
    first = cli(*args, cwd=tiny_run.parent, env_extra={"OMP_NUM_THREADS": "2"})
    assert first.returncode == 0, first.stderr
    m = STATS.search(first.stderr)
    assert m and m["threads"] == "1" and m["seed"], first.stderr
    again = cli(*args, "--seed", m["seed"], cwd=tiny_run.parent, env_extra={"OMP_NUM_THREADS": "2"})
    assert again.returncode == 0 and again.stdout == first.stdout, again.stderr
    assert STATS.search(again.stderr)["seed"] == m["seed"], again.stderr


def test_past_the_context_the_line_says_what_happened(tiny_run):
    """--max-new-tokens above the context (64): all 150 tokens come, and the line says the window slid; a
    long prompt with room for only 20 new tokens is said to be cut (here on the two threads --threads asks for)."""
    r = cli("generate", "--run", str(tiny_run), "--prompt", "def ", "--max-new-tokens", "150", "--temperature", "0",
            cwd=tiny_run.parent)
    assert r.returncode == 0, r.stderr
    assert STATS.search(r.stderr)["tokens"] == "150", r.stderr
    assert "[the model's context is 64 tokens: the window slid, re-reading the last 32 tokens every 32 new ones]" \
        in r.stderr
    r = cli("generate", "--run", str(tiny_run), "--prompt", "one two three four five " * 20, "--max-new-tokens", "20",
            "--temperature", "0", "--threads", "2", cwd=tiny_run.parent)
    assert r.returncode == 0 and STATS.search(r.stderr)["threads"] == "2", r.stderr
    assert "[the model's context is 64 tokens: the prompt was cut to its last 44 to leave room for 20 new ones]" \
        in r.stderr


def test_the_session_draws_a_seed_per_sample_unless_one_is_set(tiny_run):
    """Each sample of a session has its own seed (said after it); /seed N fixes it (the same text twice);
    /seed random goes back to drawing."""
    typed = "The \nThe \n/seed 5\nThe \nThe \n/seed random\nThe \n"
    r = cli_stdin("generate", "--run", str(tiny_run), "--max-new-tokens", "10", stdin=typed, cwd=tiny_run.parent)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "(a new seed for each sample)" in r.stdout and "seed = 5" in r.stdout and "seed = random" in r.stdout
    answers = [(m["text"], STATS.match(m["stats"])["seed"])
               for m in re.finditer(r">>> The (?P<text>.*?)\n(?P<stats>\[.*?\])\n", r.stdout, re.S)]
    assert len(answers) == 5, r.stdout
    seeds = [seed for _, seed in answers]
    assert seeds[2] == seeds[3] == "5" and answers[2][0] == answers[3][0]
    assert len({seeds[0], seeds[1], seeds[4]} - {"5"}) == 3  # drawn: all different (and none is 5)


def test_a_checkpoint_that_lost_its_optimizer_state_still_generates_and_exports(tiny_run, tmp_path):
    """generate and export read the weights, not state.pt: its loss stops a resume only."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("*.lock"))
    for state in (run / "checkpoints").glob("step_*/state.pt"):
        state.unlink()
    r = cli("generate", "--run", str(run), "--prompt", "The ", "--max-new-tokens", "4", "--seed", "1", cwd=tmp_path)
    assert r.returncode == 0 and STATS.search(r.stderr), r.stderr
    r = cli("export", "--run", str(run), "--out", str(tmp_path / "hf"), cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "hf" / "model.safetensors").is_file(), r.stderr


def test_a_cut_tokenizer_of_a_trained_run_is_named_alike_and_not_to_be_retrained(tiny_run, tmp_path):
    """generate, eval and export say the same line; retraining would give a tokenizer the checkpoints do not
    fit, so the fix is a copy of the original."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("*.lock"))
    tok = run / "tokenizer" / "tokenizer.json"
    tok.write_bytes(tok.read_bytes()[:2000])
    lines = []
    for args in (("generate", "--run", str(run), "--prompt", "The "), ("eval", "--run", str(run)),
                 ("export", "--run", str(run), "--out", str(tmp_path / "hf"))):
        r = cli(*args, cwd=tmp_path)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        lines.append(r.stderr.split(": error: ", 1)[1])
    assert len(set(lines)) == 1 and "is not a valid tokenizers file (" in lines[0], lines
    assert "restore it from a copy" in lines[0] and "retrain it" not in lines[0], lines[0]
