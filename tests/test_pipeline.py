"""The whole pipeline end to end on a small corpus written here (tiny model, 300-token BPE, 4 steps): every
artifact of the run directory contract, then resume semantics: an unchanged re-run skips the data stages, a
tokenizer change redoes tokenizer and tokenize but not prepare."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from antimatter.config import RunConfig, load_config
from antimatter.errors import UserError
from antimatter.pipeline import run_pipeline, run_stage

DATA_STAGES = ("prepare", "tokenizer", "tokenize")


def write_corpus(folder: Path, docs: int = 40, seed: int = 0) -> Path:
    """Short English documents from a seeded grammar: varied enough to pass the quality rules and dedup."""
    rng = random.Random(seed)
    subj = ["The cat", "A small dog", "My old friend", "The teacher", "Every student", "The river", "A quiet town",
            "The engineer", "Our neighbour", "The bird"]
    verb = ["walked to", "looked at", "thought about", "wrote a letter to", "sang near", "painted", "visited",
            "cleaned", "found", "remembered"]
    obj = ["the garden", "a bright window", "the long road", "the market", "an open book", "the morning sky",
           "a wooden bridge", "the station", "the sea", "a green hill"]
    tail = ["before dinner.", "in the rain.", "with great care.", "after the storm.", "on a Sunday.",
            "for the first time.", "and smiled.", "without a word."]
    folder.mkdir(parents=True)
    for i in range(docs):
        n = rng.randint(8, 20)
        text = " ".join(f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)} {rng.choice(tail)}" for _ in range(n))
        (folder / f"doc{i:03d}.txt").write_text(text + "\n", encoding="utf-8")
    return folder


def tiny_run_config(runs_dir: Path, corpus: Path, *extra: str) -> RunConfig:
    return load_config(None, tiny_overrides(runs_dir, corpus, *extra))


def tiny_overrides(runs_dir: Path, corpus: Path, *extra: str) -> list[str]:
    return [
        f"runs_dir={runs_dir}", "name=tiny", "model=tiny", f"data.sources=[{{path: '{corpus}'}}]",
        "data.val_fraction=0.2", "data.workers=1", "tokenizer.vocab_size=300", "tokenize.workers=1",
        "train.device=cpu", "train.dtype=fp32", "train.max_steps=4", "train.seq_len=32", "train.micro_batch_size=4",
        "train.warmup_steps=1", "train.eval_interval=2", "train.eval_steps=1", "train.ckpt_interval=2",
        "train.log_interval=1", "train.tensorboard=true",
        "eval.device=cpu", "eval.max_eval_tokens=256", "eval.batch_size=4", "eval.continuation_docs=2",
        "eval.prefix_tokens=8", "eval.continuation_tokens=8", "eval.speed=false", "eval.sample.max_new_tokens=8",
        *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(runs_dir, corpus, results of the first run): one full pipeline run shared by the tests below, which copy
    the run folder before changing anything."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("pipeline")
        corpus = write_corpus(root / "corpus")
        results = run_pipeline(tiny_run_config(root / "runs", corpus))
    finally:
        torch.set_num_threads(n)
    return root / "runs", corpus, results


def copy_run(finished_run, tmp_path: Path) -> Path:
    runs, _, _ = finished_run
    shutil.copytree(runs / "tiny", tmp_path / "runs" / "tiny")
    return tmp_path / "runs"


def test_pipeline_writes_the_run_directory_contract(finished_run):
    runs, corpus, results = finished_run
    run = runs / "tiny"
    assert list(results) == ["prepare", "tokenizer", "tokenize", "train", "eval"]
    assert not any(r.get("skipped") for r in results.values())

    # config.yaml: the resolved config, loadable as it is
    assert load_config(run / "config.yaml") == tiny_run_config(runs, corpus)

    # prepare
    stats = json.loads((run / "data" / "dataset_statistics.json").read_text())
    assert stats["docs_in"] == 40 and stats["train_docs"] > 0 and stats["val_docs"] > 0
    import zstandard

    for split in ("train", "val"):
        shards = sorted((run / "data" / split).glob("*.jsonl.zst"))
        assert shards, split
        first = zstandard.ZstdDecompressor().stream_reader(shards[0].open("rb")).read().decode().splitlines()[0]
        assert set(json.loads(first)) >= {"id", "source", "text"}

    # tokenizer and tokens
    tok = json.loads((run / "tokenizer" / "tokenizer.json").read_text())
    assert any(t["content"] == "<|endoftext|>" for t in tok["added_tokens"])
    meta = json.loads((run / "tokens" / "meta.json").read_text())
    assert meta["vocab_size"] == 300
    for split in ("train", "val"):
        assert list((run / "tokens" / split).glob("*.bin")), split
    for stage_dir in ("data", "tokenizer", "tokens"):
        manifest = json.loads((run / stage_dir / "manifest.json").read_text())
        assert manifest["git_commit"] and manifest["date"] and manifest["outputs"]

    # checkpoints: step folders with all four files; latest and best name one of them
    steps = sorted(p for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert steps and steps[-1].name == "step_000004"
    for step in steps:
        for f in ("model.safetensors", "state.pt", "config.yaml", "manifest.json"):
            assert (step / f).is_file(), step / f
    for pointer in ("latest", "best"):
        name = (run / "checkpoints" / pointer).read_text().strip()
        assert (run / "checkpoints" / name).is_dir()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000004"

    # logs
    metrics = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m for m in metrics) and any("val_loss" in m for m in metrics)
    assert (run / "logs" / "train.log").stat().st_size > 0
    assert list((run / "logs" / "tensorboard").rglob("events.out.tfevents.*"))

    # results
    ev = json.loads((run / "results" / "evaluations" / "final_evaluation.json").read_text())
    assert ev["val"]["loss"] > 0 and ev["val"]["perplexity"] > 1
    assert {"command", "git_commit", "device", "date"} <= set(ev["provenance"])
    samples = json.loads((run / "results" / "generated_samples" / "sample_generations.json").read_text())
    assert len(samples["samples"]) == 3
    assert list((run / "results" / "plots").glob("*.png"))


def test_rerun_skips_the_data_stages(finished_run, tmp_path, capfd):
    runs = copy_run(finished_run, tmp_path)
    run = runs / "tiny"
    before = {p: p.stat().st_mtime_ns for p in (run / "data").rglob("*") if p.is_file()}
    capfd.readouterr()
    results = run_pipeline(tiny_run_config(runs, finished_run[1]))
    err = capfd.readouterr().err
    for stage in DATA_STAGES:
        assert results[stage] == {"skipped": True}, stage
        assert f"[{stage}] up to date" in err
    assert {p: p.stat().st_mtime_ns for p in (run / "data").rglob("*") if p.is_file()} == before
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000004"  # nothing left to train


def test_eval_reruns_only_when_the_checkpoint_or_its_settings_change(finished_run, tmp_path, capfd):
    runs = copy_run(finished_run, tmp_path)
    run, corpus = runs / "tiny", finished_run[1]
    final = run / "results" / "evaluations" / "final_evaluation.json"

    def history() -> list[Path]:
        return sorted(p for p in final.parent.glob("*_step*.json") if not p.name.endswith("_files.json"))

    assert len(history()) == 1 and json.loads(history()[0].read_text()) == json.loads(final.read_text())
    before = final.read_bytes()
    capfd.readouterr()
    results = run_pipeline(tiny_run_config(runs, corpus))  # nothing changed: the evaluation still holds
    assert results["eval"] == {"skipped": True} and "[eval] up to date" in capfd.readouterr().err
    assert final.read_bytes() == before and len(history()) == 1

    latest = ("eval.checkpoint=latest",)
    results = run_pipeline(tiny_run_config(runs, corpus, *latest))  # other eval settings: evaluate again
    assert not results["eval"].get("skipped") and len(history()) == 2
    capfd.readouterr()
    results = run_pipeline(tiny_run_config(runs, corpus, *latest))
    assert results["eval"] == {"skipped": True} and "[eval] up to date" in capfd.readouterr().err

    results = run_pipeline(tiny_run_config(runs, corpus, *latest, "train.max_steps=6"))  # a new checkpoint
    assert not results["eval"].get("skipped") and "[eval] up to date" not in capfd.readouterr().err
    ev = json.loads(final.read_text())
    assert ev["checkpoint"]["step"] == 6 and len(history()) == 3 and history()[-1].name.endswith("_step000006.json")


def test_tokenizer_change_redoes_tokenizer_and_tokenize_only(finished_run, tmp_path, capfd):
    runs = copy_run(finished_run, tmp_path)
    run = runs / "tiny"
    shutil.rmtree(run / "checkpoints")  # a run with checkpoints keeps its tokenizer (next test)
    data_manifest = (run / "data" / "manifest.json").read_text()
    capfd.readouterr()
    results = run_pipeline(tiny_run_config(runs, finished_run[1], "tokenizer.vocab_size=320"), stages=DATA_STAGES)
    err = capfd.readouterr().err
    assert results["prepare"] == {"skipped": True} and "[prepare] up to date" in err
    assert not results["tokenizer"].get("skipped") and not results["tokenize"].get("skipped")
    assert "[tokenizer] up to date" not in err and "[tokenize] up to date" not in err
    assert (run / "data" / "manifest.json").read_text() == data_manifest
    assert json.loads((run / "tokens" / "meta.json").read_text())["vocab_size"] == 320
    assert json.loads((run / "tokenizer" / "manifest.json").read_text())["config"]["vocab_size"] == 320


def test_a_run_with_checkpoints_keeps_its_tokenizer(finished_run, tmp_path):
    """Another tokenizer config for a trained run: refused before anything changes, since the checkpoints are
    evaluated, sampled and resumed with the tokenizer they were trained with (it was replaced, and training
    then refused to resume on the new tokens)."""
    runs = copy_run(finished_run, tmp_path)
    run = runs / "tiny"
    before = _files(run / "tokenizer"), _files(run / "tokens")
    cfg = tiny_run_config(runs, finished_run[1], "tokenizer.vocab_size=320")
    with pytest.raises(UserError, match=r"has checkpoints trained with its tokenizer \(latest step_\d+\): a new "
                                        r"tokenizer would leave them unusable; make it in a new run \(--name NEW\)"):
        run_pipeline(cfg, stages=(*DATA_STAGES, "train"))
    assert (_files(run / "tokenizer"), _files(run / "tokens")) == before


def test_new_data_for_a_run_with_checkpoints_is_refused_before_the_data_changes(finished_run, tmp_path):
    """More sources for a trained run: prepare replaced the run's data, then the tokenizer stage refused with
    "nothing was changed" though the data no longer matched the tokens. Refused before prepare now."""
    runs = copy_run(finished_run, tmp_path)
    run = runs / "tiny"
    more = write_corpus(tmp_path / "more", docs=12, seed=5)
    before = _files(run / "data")
    cfg = tiny_run_config(runs, finished_run[1],
                          f"data.sources=[{{path: '{finished_run[1]}'}}, {{path: '{more}'}}]")
    with pytest.raises(UserError, match=r"has checkpoints trained with its tokenizer \(latest step_\d+\): new data "
                                        r"\(and so a new tokenizer\) would leave them unusable; make it in a new "
                                        r"run \(--name NEW\).*nothing was changed"):
        run_pipeline(cfg, stages=(*DATA_STAGES, "train"))
    assert _files(run / "data") == before


def test_prepare_accepts_an_absolute_glob(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", docs=12)
    cfg = tiny_run_config(tmp_path / "runs", corpus, f"data.sources=[{{path: '{corpus}/*.txt'}}]")
    stats = run_stage("prepare", cfg)
    assert stats["docs_in"] == 12


def _continue_config(tmp_path: Path, tokenizer_from: Path, init_from: Path, corpus: Path, **model: int) -> Path:
    """A YAML config for a new run on `corpus` that adopts a tokenizer and starts from an exported model."""
    import yaml

    cfg = {"name": "continued", "runs_dir": str(tmp_path / "runs"), "model": {"preset": "tiny", **model},
           "data": {"sources": [{"path": str(corpus)}], "val_fraction": 0.2, "workers": 1},
           "tokenizer": {"from": str(tokenizer_from)}, "tokenize": {"workers": 1},
           "train": {"init_from": str(init_from), "device": "cpu", "dtype": "fp32", "max_steps": 2, "seq_len": 32,
                     "micro_batch_size": 4, "warmup_steps": 0, "lr": 1e-9, "muon_lr": 1e-9, "embed_lr": 1e-9, "eval_interval": 2, "eval_steps": 1,
                     "ckpt_interval": 2, "log_interval": 1, "tensorboard": False},
           "eval": {"device": "cpu", "max_eval_tokens": 256, "batch_size": 4, "continuation_docs": 2,
                    "prefix_tokens": 8, "continuation_tokens": 8, "speed": False, "plots": False,
                    "sample": {"max_new_tokens": 8}}}
    path = tmp_path / "continue.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_continued_pretraining_of_an_exported_model_in_one_command(finished_run, tmp_path, capfd):
    """Export a trained run, then one `antimatter pipeline` on other text with `tokenizer.from` and
    `train.init_from` both naming that folder: the run adopts its tokenizer, starts from its weights, and a
    re-run skips the tokenizer stage."""
    from safetensors.torch import load_file

    from antimatter.cli import main

    runs, _, _ = finished_run
    source = runs / "tiny"
    hf = tmp_path / "hf"
    assert main(["export", "--run", str(source), "--out", str(hf)]) == 0
    corpus = write_corpus(tmp_path / "other", docs=30, seed=7)
    config = _continue_config(tmp_path, hf, hf, corpus)
    capfd.readouterr()
    assert main(["pipeline", "--config", str(config)]) == 0
    err = capfd.readouterr().err
    run = tmp_path / "runs" / "continued"
    assert "tokenizer: adopted" in err and "initialised weights from" in (run / "logs" / "train.log").read_text()
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    manifest = json.loads((run / "tokenizer" / "manifest.json").read_text())
    assert manifest["config"] == {"from": str(hf)}
    assert manifest["inputs"] == {str((hf / "tokenizer.json").resolve()): manifest["counts"]["sha256"]}
    assert json.loads((run / "tokens" / "meta.json").read_text())["vocab_size"] == 300
    # the weights it started from are the exported run's (lr 1e-9: two steps move nothing measurably)
    exported = load_file(str(source / "checkpoints" / (source / "checkpoints" / "best").read_text().strip()
                             / "model.safetensors"))
    trained = load_file(str(run / "checkpoints" / "step_000002" / "model.safetensors"))
    assert max((v - trained[k]).abs().max().item() for k, v in exported.items()) < 1e-5
    assert (run / "results" / "evaluations" / "final_evaluation.json").is_file()

    assert main(["pipeline", "--config", str(config)]) == 0  # the same command again: nothing to redo
    err = capfd.readouterr().err
    for stage in DATA_STAGES:
        assert f"[{stage}] up to date" in err, stage


def test_tokenizer_from_a_plain_file_is_redone_when_the_file_changes(finished_run, tmp_path, capfd):
    from tokenizers import Tokenizer

    runs, _, _ = finished_run
    plain = tmp_path / "elsewhere" / "tokenizer.json"
    plain.parent.mkdir()
    plain.write_bytes((runs / "tiny" / "tokenizer" / "tokenizer.json").read_bytes())
    corpus = write_corpus(tmp_path / "other", docs=30, seed=7)
    cfg = load_config(_continue_config(tmp_path, plain, runs / "tiny", corpus))
    results = run_pipeline(cfg, stages=(*DATA_STAGES, "train"))
    run = cfg.run_dir
    assert results["tokenizer"]["sha256"] and (run / "tokenizer" / "tokenizer.json").read_bytes() == plain.read_bytes()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000002"
    capfd.readouterr()
    assert run_stage("tokenizer", cfg) == {"skipped": True}
    Tokenizer.from_file(str(plain)).save(str(plain), pretty=False)  # other bytes: the stage is redone
    with pytest.raises(UserError, match="has checkpoints trained with its tokenizer"):
        run_stage("tokenizer", cfg)  # ... once the run's checkpoints are out of the way
    shutil.move(run / "checkpoints", tmp_path / "kept-checkpoints")
    again = run_stage("tokenizer", cfg)
    assert again["sha256"] != results["tokenizer"]["sha256"]
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == plain.read_bytes()


def test_tokenizer_from_refuses_a_model_vocab_too_small(finished_run, tmp_path):
    runs, _, _ = finished_run
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer.json").write_bytes((runs / "tiny" / "tokenizer" / "tokenizer.json").read_bytes())
    corpus = write_corpus(tmp_path / "other", docs=30, seed=7)
    cfg = load_config(_continue_config(tmp_path, hf, hf, corpus, vocab_size=299))
    with pytest.raises(UserError, match=r"^tokenizer.from: .*tokenizer.json has 300 tokens but model.vocab_size "
                                        r"is 299: set model.vocab_size=300"):
        run_pipeline(cfg)
    own = load_config(_continue_config(tmp_path, cfg.run_dir, hf, corpus))  # the run's own folder
    (own.run_dir / "tokenizer").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(hf / "tokenizer.json", own.run_dir / "tokenizer" / "tokenizer.json")
    with pytest.raises(UserError, match=r"is this run's own tokenizer, which the tokenizer stage rewrites"):
        run_stage("tokenizer", own)
    assert (own.run_dir / "tokenizer" / "tokenizer.json").is_file()  # refused before anything was cleared


# ------------------------------------------------------------------------------ a prepared folder (--prepared)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def prepared_folder(finished_run, tmp_path_factory) -> Path:
    """`antimatter prepare --out DIR` on the corpus and settings of the finished run."""
    from antimatter.cli import main

    runs, corpus, _ = finished_run
    out = tmp_path_factory.mktemp("prepared") / "api-docs-prepared"
    assert main(["prepare", "--out", str(out), *tiny_overrides(runs, corpus)]) == 0
    return out


def test_a_prepared_folder_gives_the_tokens_of_the_runs_own_data(finished_run, prepared_folder, tmp_path, capfd):
    """prepare --out DIR, then tokenizer and tokenize --prepared DIR in another run: the same tokenizer and
    token shards as the pipeline made from its own data folder; DIR is read, never written."""
    from antimatter.cli import main

    runs, corpus, _ = finished_run
    before = _files(prepared_folder)
    other = tiny_overrides(tmp_path / "runs", corpus, "name=from-prepared")
    for stage in ("tokenizer", "tokenize"):
        assert main([stage, "--prepared", str(prepared_folder), *other]) == 0
    run, own = tmp_path / "runs" / "from-prepared", runs / "tiny"
    assert not (run / "data").exists()
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == (own / "tokenizer" / "tokenizer.json").read_bytes()
    shards = {p.relative_to(run / "tokens") for p in (run / "tokens").rglob("*.bin")}
    assert shards and shards == {p.relative_to(own / "tokens") for p in (own / "tokens").rglob("*.bin")}
    for rel in shards:
        assert (run / "tokens" / rel).read_bytes() == (own / "tokens" / rel).read_bytes(), rel
    assert _files(prepared_folder) == before
    capfd.readouterr()
    assert main(["tokenize", "--prepared", str(prepared_folder), *other]) == 0  # nothing changed: up to date
    assert "[tokenize] up to date" in capfd.readouterr().err


def test_pipeline_with_a_prepared_folder_skips_its_prepare(prepared_folder, tmp_path, capfd):
    """The sources named in the config do not even exist: the pipeline reads the prepared folder instead of
    preparing, and leaves it as it was."""
    before = _files(prepared_folder)
    cfg = tiny_run_config(tmp_path / "runs", tmp_path / "no-such-corpus", f"data.prepared={prepared_folder}")
    capfd.readouterr()
    results = run_pipeline(cfg, stages=DATA_STAGES)
    err = capfd.readouterr().err
    assert results["prepare"] == {"skipped": True}
    assert f"[prepare] reading the prepared folder {prepared_folder} (data.prepared)" in err
    assert not (cfg.run_dir / "data").exists() and (cfg.run_dir / "tokens" / "meta.json").is_file()
    assert _files(prepared_folder) == before


def test_a_folder_that_is_not_a_prepared_folder_is_one_line(finished_run, prepared_folder, tmp_path, capfd):
    """Not a folder, no manifest, a damaged manifest, another stage's folder, a shard cut after prepare wrote
    it: each is one line saying what to run, and nothing in the folder is touched."""
    from antimatter.cli import main

    runs, corpus, _ = finished_run
    empty, damaged, cut = tmp_path / "empty", tmp_path / "damaged", tmp_path / "cut"
    empty.mkdir()
    (empty / "notes.txt").write_text("my own file")
    shutil.copytree(prepared_folder, damaged)
    (damaged / "manifest.json").write_text("{not json")
    shutil.copytree(prepared_folder, cut)
    shard = sorted((cut / "train").glob("*.jsonl.zst"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    cases = [
        (tmp_path / "nope", "is not a folder: run `antimatter prepare PATH... --out"),
        (empty, f"is not a prepared folder (its manifest.json is missing): if it holds your text, run "
                f"`antimatter prepare {empty} --out {empty}-prepared` first and pass --prepared {empty}-prepared"),
        (empty / "notes.txt", f"is a file, not a prepared folder: if it holds your text, run `antimatter prepare "
                              f"{empty / 'notes.txt'} --out {empty / 'notes.txt'}-prepared` first"),
        (damaged, "is not a prepared folder (its manifest.json is damaged): run `antimatter prepare"),
        (runs / "tiny" / "tokens", "was written by `antimatter tokenize`, not by `antimatter prepare`"),
        (cut, f"{shard} is {shard.stat().st_size:,} bytes where its manifest says"),
    ]
    other = tiny_overrides(tmp_path / "runs", corpus, "name=bad")
    for folder, message in cases:
        before = _files(folder) if folder.is_dir() else None
        for command in ("tokenizer", "pipeline"):
            capfd.readouterr()
            assert main([command, "--prepared", str(folder), *other]) == 2
            lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith(f"antimatter {command}: error: "), lines
            assert message in lines[0], (message, lines[0])
        assert (_files(folder) if folder.is_dir() else None) == before
    assert "run `antimatter prepare PATH... --out" in lines[0] and "again" in lines[0]
    assert not (tmp_path / "runs" / "bad").exists()  # refused before the run folder is made
