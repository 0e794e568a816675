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


def write_corpus(folder: Path, docs: int = 40) -> Path:
    """Short English documents from a seeded grammar: varied enough to pass the quality rules and dedup."""
    rng = random.Random(0)
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
    return load_config(None, [
        f"runs_dir={runs_dir}", "name=tiny", "model=tiny", f"data.sources=[{{path: '{corpus}'}}]",
        "data.val_fraction=0.2", "data.workers=1", "tokenizer.vocab_size=300", "tokenize.workers=1",
        "train.device=cpu", "train.dtype=fp32", "train.max_steps=4", "train.seq_len=32", "train.micro_batch_size=4",
        "train.warmup_steps=1", "train.eval_interval=2", "train.eval_steps=1", "train.ckpt_interval=2",
        "train.log_interval=1", "train.tensorboard=true",
        "eval.device=cpu", "eval.max_eval_tokens=256", "eval.batch_size=4", "eval.continuation_docs=2",
        "eval.prefix_tokens=8", "eval.continuation_tokens=8", "eval.speed=false", "eval.sample.max_new_tokens=8",
        *extra])


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


def test_train_refuses_to_resume_across_a_tokenizer_change(finished_run, tmp_path):
    """New tokens under old checkpoints: training must not silently continue the old model on other ids."""
    runs = copy_run(finished_run, tmp_path)
    cfg = tiny_run_config(runs, finished_run[1], "tokenizer.vocab_size=320")
    with pytest.raises(UserError, match="training tokens changed since this state was saved") as e:
        run_pipeline(cfg, stages=(*DATA_STAGES, "train"))
    assert "train.resume=none" in str(e.value)


def test_prepare_accepts_an_absolute_glob(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", docs=12)
    cfg = tiny_run_config(tmp_path / "runs", corpus, f"data.sources=[{{path: '{corpus}/*.txt'}}]")
    stats = run_stage("prepare", cfg)
    assert stats["docs_in"] == 12
