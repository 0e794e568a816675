"""Evaluation: sliding-window perplexity against a direct computation, bits per byte, unigram baseline,
user files, continuation metrics, speed, plots, the report on a tiny real run, and bad input."""

from __future__ import annotations

import gzip
import importlib
import inspect
import json
import math
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zstandard

from antimatter.config import load_config, preset_model, save_config
from antimatter.errors import UserError
from antimatter.eval.continuation import distinct_n, repetition_rate, split_documents, text_metrics
from antimatter.eval.perplexity import (
    read_documents,
    score_sequences,
    sliding_windows,
    token_byte_lengths,
    unigram_score,
)
from antimatter.eval.plots import plot_training
from antimatter.eval.report import EVAL_DIR, EVAL_FILE, SAMPLES_DIR, SAMPLES_FILE, compare_runs, run_eval
from antimatter.model.gpt import GPT

STDLIB = ["json", "os", "re", "collections", "functools", "itertools", "pathlib", "argparse", "logging",
          "subprocess", "threading", "random", "string", "textwrap", "datetime", "decimal", "fractions",
          "statistics", "heapq", "bisect", "csv", "email", "zipfile", "tarfile", "shutil", "tempfile",
          "dataclasses", "enum", "inspect", "ast", "pickle", "copy", "pprint", "difflib", "hashlib"]


def stdlib_docs(limit: int = 400) -> list[str]:
    """Real English text available on any machine: docstrings of standard-library modules and members."""
    docs = []
    for name in STDLIB:
        mod = importlib.import_module(name)
        for obj in [mod, *[getattr(mod, a) for a in sorted(vars(mod)) if not a.startswith("_")]]:
            d = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj)) \
                else None
            if d and len(d) > 80 and d not in docs:
                docs.append(d)
    return docs[:limit]


def write_split(path: Path, texts: list[str], prefix: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": f"{prefix}/{i}", "source": ("even", "odd")[i % 2], "text": t})
             for i, t in enumerate(texts)]
    (path / "00000.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))


def build_tiny_run(root: Path, steps: int = 120, name: str = "tiny", vocab_size: int = 400) -> Path:
    """A real run folder: stdlib docstrings -> real BPE tokenizer -> real token shards -> the tiny GPT trained
    a hundred steps on CPU -> a real checkpoint and logs/metrics.jsonl."""
    from antimatter.checkpoint import save_checkpoint
    from antimatter.tokenizer import train_tokenizer
    from antimatter.tokens import TokenWindows, run_tokenize

    cfg = load_config(None, ["model=tiny", f"name={name}", f"runs_dir={root}", f"tokenizer.vocab_size={vocab_size}",
                             "train.device=cpu", "train.micro_batch_size=16", f"train.max_steps={steps}"])
    run = cfg.run_dir
    docs = stdlib_docs()
    write_split(run / "data" / "train", docs[20:], "train")
    write_split(run / "data" / "val", docs[:20], "val")
    train_tokenizer(cfg, run / "data", run / "tokenizer")
    run_tokenize(cfg, run / "data", run / "tokenizer", run / "tokens")
    save_config(cfg, run / "config.yaml")

    torch.manual_seed(0)
    model = GPT(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    loader = TokenWindows(run / "tokens" / "train", cfg.seq_len, seed=0)
    (run / "logs").mkdir(parents=True, exist_ok=True)
    tokens = 0
    with open(run / "logs" / "metrics.jsonl", "w") as log:
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            lr = 3e-3 * min(1.0, step / 10)  # linear warmup, then constant
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = loader.next_batch(cfg.train.micro_batch_size)
            loss = model(x, y)
            opt.zero_grad()
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            tokens += x.numel()
            log.write(json.dumps({"step": step, "train_loss": loss.item(), "lr": lr, "grad_norm": gn.item(),
                                  "tokens": tokens, "tokens_per_s": x.numel() / (time.perf_counter() - t0)}) + "\n")
            if step % 40 == 0:
                with torch.no_grad():
                    model.eval()
                    vx, vy = TokenWindows(run / "tokens" / "val", cfg.seq_len, seed=0).next_batch(4)
                    log.write(json.dumps({"step": step, "val_loss": model(vx, vy).item(), "tokens": tokens}) + "\n")
                    model.train()
    save_checkpoint(run / "checkpoints", steps, model.state_dict(), {"step": steps, "tokens_seen": tokens}, cfg,
                    best=True)
    return run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_run(tmp_path_factory.mktemp("evalrun"))


def eval_cfg(run: Path, *extra: str):
    return load_config(run / "config.yaml", ["eval.device=cpu", "eval.max_eval_tokens=2000", "eval.continuation_docs=4",
                                             "eval.prefix_tokens=16", "eval.continuation_tokens=12",
                                             "eval.speed_new_tokens=6", "eval.speed_batch=4",
                                             "eval.sample.max_new_tokens=12", *extra])


# --------------------------------------------------------------------------------- sliding windows


@pytest.mark.parametrize("n,L,S", [(2, 8, 8), (8, 8, 8), (9, 8, 8), (10, 8, 3), (50, 8, 1), (33, 8, 5), (100, 16, 8)])
def test_sliding_windows_score_every_target_once_with_context(n: int, L: int, S: int) -> None:
    seen = []
    for a, b, s in sliding_windows(n, L, S):
        assert b - a <= L and a < s <= b
        for i in range(s, b + 1):
            seen.append(i)
            if a > 0:  # a later window: at least L - S + 1 tokens of context
                assert i - a >= L - S + 1
            else:
                assert i - a == i  # first window: all available context
    assert seen == list(range(1, n))


def direct_nll(model: GPT, x: np.ndarray, L: int, S: int) -> float:
    """Token by token: for every target, one forward over exactly the context its window gives it."""
    total = 0.0
    with torch.no_grad():
        for a, b, s in sliding_windows(len(x), L, S):
            for i in range(s, b + 1):
                ctx = torch.tensor(x[a:i], dtype=torch.long)[None]
                logp = F.log_softmax(model(ctx)[0, -1].double(), -1)
                total -= float(logp[int(x[i])])
    return total


def test_sliding_window_matches_direct_computation() -> None:
    torch.manual_seed(0)
    model = GPT(preset_model("tiny")).eval()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 512, size=n) for n in (100, 40, 2, 65)]
    lens = np.ones(512, dtype=np.int64)
    for L, S in ((64, 16), (64, 64), (32, 7)):
        got = score_sequences(model, seqs, L, S, lens, batch_size=3)
        want = sum(direct_nll(model, x, L, S) for x in seqs)
        assert got.tokens == sum(len(x) - 1 for x in seqs) == got.bytes
        assert got.nll == pytest.approx(want, rel=1e-4)
    # stride = context: exactly the training loss over non-overlapping windows
    x = torch.from_numpy(rng.integers(0, 512, size=129))
    batch = torch.stack([x[:65], x[64:129]])
    mean = model(batch[:, :-1], batch[:, 1:]).item()
    got = score_sequences(model, [x.numpy()], 64, 64, lens)
    assert got.loss == pytest.approx(mean, rel=1e-5)


def test_byte_lengths_make_bits_per_byte_exact(tiny_run: Path) -> None:
    from antimatter.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_run)
    lens = token_byte_lengths(tok)
    assert lens[tok.eot_id] == 0
    for text in ("plain ascii", "Größe naïve café — 日本語 🙂🚀", "def f(x):\n\treturn x\n"):
        assert int(lens[tok.encode(text)].sum()) == len(text.encode("utf-8"))


def test_unigram_baseline_is_add_one_smoothed() -> None:
    counts = np.array([3, 1, 0, 0])
    got = unigram_score(counts, [np.array([0, 1, 2, 0])], np.array([0, 1, 2, 3]))
    p = {1: 2 / 8, 2: 1 / 8, 0: 4 / 8}
    assert got.tokens == 3 and got.bytes == 1 + 2 + 0
    assert got.nll == pytest.approx(-math.log(p[1]) - math.log(p[2]) - math.log(p[0]))


# ------------------------------------------------------------------------------------------ user files


def test_read_documents_formats(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one document\n")
    (tmp_path / "b.md").write_text("# Title\n\nbody")
    recs = "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["first", "second", " "])) + "\n"
    (tmp_path / "c.jsonl").write_text(recs)
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(recs.encode()))
    (tmp_path / "e.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(recs.encode()))
    (tmp_path / "f.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    assert read_documents(tmp_path / "a.txt") == (["one document\n"], "text")
    assert read_documents(tmp_path / "b.md")[1] == "text"
    for name in ("c.jsonl", "d.jsonl.gz", "e.jsonl.zst"):
        assert read_documents(tmp_path / name) == (["first", "second"], "jsonl")
    assert read_documents(tmp_path / "f.jsonl", text_field="content") == (["x"], "jsonl")


@pytest.mark.parametrize("name,content,match", [
    ("empty.txt", b"", "is empty"),
    ("blank.md", b"  \n\n\t\n", "is empty"),
    ("empty.jsonl", b"\n\n", "is empty"),
    ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00", "looks binary"),
    ("latin1.txt", "café".encode("latin-1"), "not UTF-8 text"),
    ("data.parquet", b"PAR1", "unknown eval file format"),
    ("noext", b"text", "unknown eval file format"),
    ("bad.jsonl", b'{"text": "ok"}\n{broken\n', "line 2 is not valid JSON"),
    ("field.jsonl", b'{"body": "ok"}\n', "no string field 'text'"),
    ("trunc.jsonl.gz", gzip.compress(b'{"text": "hello"}\n')[:12], "cannot read eval file"),
])
def test_bad_eval_files_give_one_line_errors(tmp_path: Path, name: str, content: bytes, match: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=match) as e:
        read_documents(tmp_path / name)
    assert "\n" not in str(e.value) and ":" in str(e.value)


def test_missing_eval_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="eval file not found.*--data"):
        read_documents(tmp_path / "nope.txt")


# ------------------------------------------------------------------------------- continuation metrics


def test_continuation_metrics() -> None:
    docs = split_documents(np.array([5, 6, 0, 7, 0, 0, 8]), 0)
    assert [d.tolist() for d in docs] == [[5, 6], [7], [8]]
    assert distinct_n(["a b a b"], 1) == 0.5 and distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n([""], 2) == 0.0
    assert repetition_rate([[1, 2, 3, 4, 1, 2, 3, 4]], 4) == pytest.approx(1 - 4 / 5)
    assert repetition_rate([[1, 2, 3, 4, 5]], 4) == 0.0
    same = text_metrics(["the cat sat on the mat today"], ["the cat sat on the mat today"])
    assert same["bleu"] == pytest.approx(100.0) and same["rouge_l_f1"] == pytest.approx(1.0)
    diff = text_metrics(["completely unrelated words here"], ["the cat sat on the mat today"])
    assert diff["bleu"] < 5 and diff["rouge_l_f1"] == 0.0


# ------------------------------------------------------------------------------------------------ plots


def test_plots_from_metrics(tmp_path: Path) -> None:
    lines = [{"step": s, "loss": 5 - s / 50, "lr": 1e-3, "grad_norm": 1.0, "tokens_seen": 512 * s,
              "tokens_per_s": 1000.0, "mfu": 0.3} for s in range(1, 101)]
    lines += [{"step": s, "split": "val", "loss": 5 - s / 60} for s in (50, 100)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 101, "lo')  # crash-truncated tail
    out = plot_training(path, tmp_path / "plots")
    names = sorted(Path(p).name for p in out["plots"])
    assert names == ["grad_norm.png", "loss_vs_step.png", "loss_vs_tokens.png", "lr.png", "perplexity.png",
                     "throughput.png"]
    assert all(Path(p).stat().st_size > 5000 for p in out["plots"])
    assert plot_training(tmp_path / "missing.jsonl", tmp_path / "p2")["plots"] == []


# ---------------------------------------------------------------------------------- the whole report


def test_run_eval_writes_report(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = tmp_path / "essay.md"
    text.write_text(" ".join(stdlib_docs()[:3]) * 3)
    jl = tmp_path / "docs.jsonl.zst"
    jl.write_bytes(zstandard.ZstdCompressor().compress(
        "\n".join(json.dumps({"text": d}) for d in stdlib_docs()[3:8]).encode()))
    res = run_eval(eval_cfg(tiny_run, "eval.stride=32"), tiny_run)
    out = capsys.readouterr().out
    assert "val perplexity" in out and "final_evaluation.json" in out
    assert "(eager:" in out  # which decode path was timed
    final_bytes = (tiny_run / EVAL_FILE).read_bytes()
    samples_bytes = (tiny_run / SAMPLES_FILE).read_bytes()
    assert Path(res["outputs"]["history"]).read_bytes() == final_bytes  # the latest full evaluation, as kept
    assert Path(res["outputs"]["samples_history"]).read_bytes() == samples_bytes

    # --data: only those files, into a history entry of their own; the full evaluation stays byte-identical
    scored = run_eval(eval_cfg(tiny_run, "eval.stride=32"), tiny_run, data_files=[str(text), str(jl)])
    out = capsys.readouterr().out
    assert "essay.md" in out and "docs.jsonl.zst" in out and "val perplexity" not in out
    assert (tiny_run / EVAL_FILE).read_bytes() == final_bytes
    assert (tiny_run / SAMPLES_FILE).read_bytes() == samples_bytes
    entry = Path(scored["outputs"]["evaluation"])
    assert entry.parent == tiny_run / EVAL_DIR and re.fullmatch(r"\d{8}T\d{6}Z_step000120(_\d+)?_files\.json", entry.name)
    assert json.loads(entry.read_text()) == scored and scored["kind"] == "files" and "val" not in scored
    assert scored["checkpoint"]["manifest_sha256"] == res["checkpoint"]["manifest_sha256"]

    saved = json.loads((tiny_run / "results/evaluations/final_evaluation.json").read_text())
    assert saved["val"] == res["val"]
    v = saved["val"]
    assert v["tokens"] == 2000 and v["stride"] == 32 and v["seq_len"] == 64
    assert v["perplexity"] == pytest.approx(math.exp(v["loss"]))
    assert v["bits_per_byte"] == pytest.approx(v["nll_nats"] / math.log(2) / v["bytes"])
    assert v["perplexity"] < v["unigram_perplexity"]  # 120 steps already beat token frequencies
    by_source = v["by_source"]
    assert sorted(by_source) == ["even", "odd"] and sum(x["tokens"] for x in by_source.values()) <= 2000
    assert all(x["documents"] > 0 and x["bits_per_byte"] > 0 for x in by_source.values())
    files = {Path(f["path"]).name: f for f in scored["files"]}
    assert files["essay.md"]["bytes"] == files["essay.md"]["text_bytes"]  # every byte scored once
    assert files["docs.jsonl.zst"]["documents"] == 5 and len(files["docs.jsonl.zst"]["sha256"]) == 64
    c = saved["continuation"]
    assert c["documents"] == 4 and 0 <= c["bleu"] <= 100 and 0 <= c["rouge_l_f1"] <= 1 and c["examples"]
    s = saved["speed"]
    assert s["decode_path"] == "eager: antimatter generate's default" and "compiled_decode_path" not in s
    assert s["prefill_tokens_per_s"] > 0 and s["decode_tokens_per_s_batch4"] > 0 and s["peak_memory_bytes"] > 0
    z = saved["size"]
    assert z["params_total"] == GPT(preset_model("tiny", "modern")).num_params() and z["bytes_bf16"] == 2 * z["params_total"]
    assert z["disk_bytes_weights"] > 0
    assert saved["checkpoint"]["step"] == 120 and len(saved["checkpoint"]["sha256"]) == 64
    assert len(saved["tokenizer"]["sha256"]) == 64 and saved["data"]["val_shards"]
    p = saved["provenance"]
    assert p["git_commit"] and p["device"].startswith("CPU") and p["torch"] == torch.__version__ and p["date"]
    assert len(saved["outputs"]["plots"]) == 6

    samples = json.loads((tiny_run / "results/generated_samples/sample_generations.json").read_text())
    assert [x["prompt"] for x in samples["samples"]][0] == "The future of artificial intelligence"
    assert samples["seed"] == 42 and samples["settings"]["max_new_tokens"] == 12

    table = compare_runs([tiny_run, tiny_run])  # files scored with --data against this checkpoint get rows
    assert "val perplexity" in table and "essay.md bits/byte" in table and "val odd bits/byte" in table and f"{v['perplexity']:.2f}" in table
    assert f"{files['essay.md']['bits_per_byte']:.4f}" in table and "warning" not in table


def test_evaluations_keep_a_history(tiny_run: Path) -> None:
    """Two evaluations: two history files (and their samples), nothing earlier deleted, and
    final_evaluation.json is the later one."""
    def full_entries() -> set[Path]:
        return {p for p in (tiny_run / EVAL_DIR).glob("*_step*.json") if not p.name.endswith("_files.json")}

    before = full_entries()
    quick = ("eval.speed=false", "eval.plots=false", "eval.unigram=false", "eval.continuation_docs=1")
    first = run_eval(eval_cfg(tiny_run, *quick), tiny_run)
    second = run_eval(eval_cfg(tiny_run, *quick, "eval.max_eval_tokens=1000"), tiny_run)
    new = full_entries() - before
    assert new == {Path(first["outputs"]["history"]), Path(second["outputs"]["history"])} and before <= full_entries()
    assert json.loads(Path(first["outputs"]["history"]).read_text())["val"]["tokens"] == 2000
    assert json.loads((tiny_run / EVAL_FILE).read_text()) == second and second["val"]["tokens"] == 1000
    assert {Path(first["outputs"]["samples_history"]), Path(second["outputs"]["samples_history"])} <= set(
        (tiny_run / SAMPLES_DIR).glob("*_step000120*.json"))


def test_compare_warns_when_tokenizers_or_val_sets_differ(tiny_run: Path, tmp_path: Path) -> None:
    quick = ("eval.speed=false", "eval.plots=false", "eval.unigram=false", "eval.by_source=false",
             "eval.continuation_docs=1")
    if not (tiny_run / EVAL_FILE).is_file():
        run_eval(eval_cfg(tiny_run, *quick), tiny_run)
    assert "warning" not in compare_runs([tiny_run, tiny_run])

    same = tmp_path / "same"  # the same checkpoint scored on fewer val tokens
    shutil.copytree(tiny_run, same)
    run_eval(eval_cfg(same, *quick, "eval.max_eval_tokens=500"), same)
    first = compare_runs([tiny_run, same]).splitlines()[0]
    assert first.startswith("warning: these runs used different val sets") and "500 tokens" in first
    assert "tokenizers" not in first

    other = build_tiny_run(tmp_path, steps=5, name="other", vocab_size=360)  # another tokenizer
    run_eval(eval_cfg(other, *quick), other)
    first = compare_runs([tiny_run, other]).splitlines()[0]
    assert first.startswith("warning: these runs used different tokenizers")
    assert "loss and perplexity are not comparable; bits per byte is" in first  # bits per byte: no tokenizer
    assert "val sets" in first  # other ids for the same text


def test_compare_does_not_call_an_older_evaluation_of_the_same_val_set_different(tiny_run: Path,
                                                                                  tmp_path: Path) -> None:
    """An evaluation written before val tokens were hashed names its val shards' file hashes, which also
    cover the shard header: with the same token and byte counts that is unverified, not a different set."""
    if not (tiny_run / EVAL_FILE).is_file():
        run_eval(eval_cfg(tiny_run, "eval.speed=false", "eval.plots=false", "eval.unigram=false",
                          "eval.continuation_docs=1"), tiny_run)
    older = json.loads((tiny_run / EVAL_FILE).read_text())
    del older["val"]["tokens_sha256"]
    older["data"]["val_shards"] = {name: "0" * 64 for name in older["data"]["val_shards"]}  # a zeroed header
    (tmp_path / "older" / EVAL_FILE).parent.mkdir(parents=True)
    (tmp_path / "older" / EVAL_FILE).write_text(json.dumps(older))
    first = compare_runs([tiny_run, tmp_path / "older"]).splitlines()[0]
    assert first.startswith("note: older was evaluated before val tokens were hashed") and "not verified" in first
    assert "not comparable" not in first

    older["val"]["tokens"] -= 1  # fewer tokens: a different val set, hashed or not
    (tmp_path / "older" / EVAL_FILE).write_text(json.dumps(older))
    first = compare_runs([tiny_run, tmp_path / "older"]).splitlines()[0]
    assert first.startswith("warning: these runs used different val sets") and "not comparable" in first


def test_non_overlapping_val_matches_eval_windows(tiny_run: Path) -> None:
    """stride = context reproduces the training loop's val loss computation (tokens.eval_windows)."""
    from antimatter.checkpoint import load_model
    from antimatter.tokens import eval_windows

    res = run_eval(eval_cfg(tiny_run, "eval.speed=false", "eval.plots=false", "eval.unigram=false",
                            "eval.continuation_docs=1"), tiny_run)
    model, cfg, _ = load_model(tiny_run)
    nll = count = 0.0
    with torch.no_grad():
        for x, y in eval_windows(tiny_run / "tokens/val", 64, 8, max_tokens=2000):
            k = int((y != -1).sum())
            nll += model(x, y).item() * k
            count += k
    assert count == res["val"]["tokens"]
    assert res["val"]["loss"] == pytest.approx(nll / count, rel=1e-5)


def test_compare_runs_needs_evaluations(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="run `antimatter eval --run"):
        compare_runs([tmp_path])
    with pytest.raises(UserError, match="--compare .*nope: no such run folder or evaluation file: check the path"):
        compare_runs([tmp_path / "nope"])


# ----------------------------------------------------------------------------------------- bad runs


def test_run_without_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "fresh"
    (run / "tokens").mkdir(parents=True)
    with pytest.raises(UserError, match="train first"):
        run_eval(load_config(None, ["model=tiny"]), run)
    with pytest.raises(UserError, match="does not exist"):
        run_eval(load_config(None, ["model=tiny"]), tmp_path / "nowhere")


def test_checkpoint_not_matching_run_config(tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_run, other, ignore=shutil.ignore_patterns("results"))
    cfg = load_config(other / "config.yaml", ["model.n_layer=3"])
    save_config(cfg, other / "config.yaml")
    with pytest.raises(UserError, match=r"does not match the run's config .*model.n_layer 3 vs 2"):
        run_eval(eval_cfg(other), other)


def test_weights_not_matching_checkpoint_config(tiny_run: Path, tmp_path: Path) -> None:
    from antimatter.checkpoint import save_checkpoint

    run = tmp_path / "bad"
    run.mkdir()
    cfg = load_config(tiny_run / "config.yaml")
    wider = GPT(load_config(None, ["model=tiny", "model.d_model=64"]).model)
    save_checkpoint(run / "checkpoints", 1, wider.state_dict(), {"step": 1}, cfg, best=True)
    with pytest.raises(UserError, match="does not describe this checkpoint.s weights"):
        run_eval(eval_cfg(tiny_run), run)


def test_bad_data_file_fails_before_the_work(tiny_run: Path, tmp_path: Path) -> None:
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(UserError, match="looks binary"):
        run_eval(eval_cfg(tiny_run), tiny_run, data_files=[str(tmp_path / "blob.txt")])


@pytest.mark.parametrize("override,match", [
    ("eval.stride=-4", "eval.stride must be >= 0"),
    ("eval.batch_size=0", "eval.batch_size must be positive"),
    ("eval.dtype=int8", "eval.dtype must be auto"),
])
def test_bad_eval_settings(tiny_run: Path, override: str, match: str) -> None:
    with pytest.raises(UserError, match=match):
        run_eval(eval_cfg(tiny_run, override), tiny_run)


def test_unknown_checkpoint_name(tiny_run: Path) -> None:
    with pytest.raises(UserError, match="checkpoint 'step_999' not found.*use best, latest"):
        run_eval(eval_cfg(tiny_run), tiny_run, checkpoint="step_999")


def test_cli_eval_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from antimatter.cli import main

    assert main(["eval", "--run", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("antimatter eval: error: run folder") and "\n" not in err and "Traceback" not in err


def test_cli_compare(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    from antimatter.cli import main

    if not (tiny_run / "results/evaluations/final_evaluation.json").is_file():
        run_eval(eval_cfg(tiny_run, "eval.speed=false", "eval.plots=false"), tiny_run)
    assert main(["eval", "--compare", str(tiny_run), str(tiny_run)]) == 0
    assert "val bits/byte" in capsys.readouterr().out


def test_eval_int8_reports_the_perplexity_it_costs(tiny_run: Path) -> None:
    res = run_eval(eval_cfg(tiny_run, "eval.int8=true", "eval.plots=false", "eval.by_source=false"), tiny_run)
    v, q = res["val"], res["val"]["int8"]
    assert q["tokens"] == v["tokens"] and q["perplexity"] == pytest.approx(math.exp(q["loss"]))
    assert q["perplexity_change_pct"] == pytest.approx(100 * (q["perplexity"] / v["perplexity"] - 1))
    assert q["perplexity"] != v["perplexity"] and abs(q["perplexity_change_pct"]) < 5  # rounding, not damage
    assert "torchao" in q["method"] and res["speed_int8"]["decode_tokens_per_s_batch1"] > 0


def test_eval_int8_without_torchao_fails_before_the_work(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(UserError, match="int8 weight-only quantisation needs torchao"):
        run_eval(eval_cfg(tiny_run, "eval.int8=true"), tiny_run)


def test_cli_generate_int8(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    from antimatter.cli import main

    assert main(["generate", "--run", str(tiny_run), "--prompt", "def ", "--int8", "--max-new-tokens", "8",
                 "--device", "cpu", "--seed", "0"]) == 0  # a seed: without one each run samples anew
    out = capsys.readouterr()
    assert out.out.startswith("def ") and "tokens/s on cpu" in out.err


def test_a_folder_given_to_eval_data_is_named_a_folder(tmp_path):
    """It was reported as "not found"."""
    (tmp_path / "texts").mkdir()
    with pytest.raises(UserError, match=r"eval file .*texts is a folder: give --data its files"):
        read_documents(tmp_path / "texts")
