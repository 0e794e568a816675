"""`antimatter eval`: turn a run (or one of its checkpoints) into the evidence a user shows.

Every evaluation keeps its own files; nothing earlier is deleted. Under RUN/results/:
  * evaluations/STAMP_stepNNNNNN.json - one full evaluation: val loss / perplexity / bits per byte, the
    unigram baseline, continuation quality, speed, size, and provenance (command, git commit, checkpoint and
    the sha256 of its weights and manifest, tokenizer hash, the scored val tokens' hash, device, versions,
    date); STAMP is the UTC time it was written (20261124T101530Z);
  * evaluations/final_evaluation.json - a copy of the latest full evaluation (what the pipeline, export and
    the docs read), replaced atomically;
  * evaluations/STAMP_stepNNNNNN_files.json - `eval --data FILE ...`: loss / perplexity / bits per byte of
    those files only; final_evaluation.json and the samples stay as they are;
  * generated_samples/STAMP_stepNNNNNN.json and sample_generations.json (the latest) - the config's
    prompts, sampling settings, seed, outputs;
  * plots/*.png - training curves from logs/metrics.jsonl (redrawn by each full evaluation).
`evaluation_is_current` tells the pipeline whether final_evaluation.json still belongs to the checkpoint;
`compare_runs` prints several runs' final_evaluation.json side by side.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from antimatter.checkpoint import CheckpointError, check_checkpoint_tokenizer, load_model, resolve_checkpoint
from antimatter.config import EvalConfig, RunConfig, config_to_dict, load_config
from antimatter.data.records import iter_records, split_files
from antimatter.device import pick_device, resolve_dtype
from antimatter.errors import UserError, shorten
from antimatter.eval.continuation import evaluate_continuations
from antimatter.eval.perplexity import (
    Score,
    read_documents,
    score_by_source,
    score_files,
    score_sequences,
    score_windows,
    token_byte_lengths,
    unigram_score,
)
from antimatter.eval.plots import plot_training
from antimatter.eval.size import model_size
from antimatter.eval.speed import measure_speed
from antimatter.files import atomic_write_text
from antimatter.model.generate import continue_texts
from antimatter.model.gpt import GPT
from antimatter.model.quantize import INT8_METHOD, int8_copy, require_torchao
from antimatter.provenance import provenance, sha256_file
from antimatter.tokenizer import Tokenizer, load_tokenizer
from antimatter.tokens import TokenShards, check_tokenizer, read_meta

EVAL_DIR = Path("results/evaluations")
EVAL_FILE = EVAL_DIR / "final_evaluation.json"
SAMPLES_DIR = Path("results/generated_samples")
SAMPLES_FILE = SAMPLES_DIR / "sample_generations.json"
PLOTS_DIR = Path("results/plots")
CONTINUATION_SCAN_TOKENS = 4_000_000
RESULT_ORDER = ("kind", "run", "checkpoint", "model", "tokenizer", "val", "files", "continuation", "speed", "speed_int8",
                "size", "plots", "data", "settings", "outputs", "provenance", "seconds")
BYTE_COUNT_METHOD = ("sum of the UTF-8 byte lengths of the scored tokens (byte-level BPE: each token is a fixed "
                     "byte string; <|endoftext|> counts 0 bytes)")


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _history_name(run_dir: Path, step: Any, suffix: str = "") -> str:
    """A new history name, STAMP_stepNNNNNN{suffix} (UTC), with _2, _3 ... added when that second is taken
    (in results/evaluations or results/generated_samples), so that names sort in the order they were made."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    base = f"{stamp}_step{step:06d}" if isinstance(step, int) else f"{stamp}_step-unknown"

    def name(n: int) -> str:
        return f"{base}{f'_{n + 1}' if n else ''}{suffix}"

    n = 0
    while any((run_dir / d / f"{name(n)}.json").exists() for d in (EVAL_DIR, SAMPLES_DIR)):
        n += 1
    return name(n)


def _model_shape(model_cfg) -> dict:
    d = dict(config_to_dict(model_cfg))
    d.pop("preset", None)
    d.pop("dropout", None)
    return d


def check_settings(ev) -> None:
    """Eval settings that would fail deep inside the work: refuse them up front, naming the key."""
    if ev.int8:
        require_torchao()


def load_for_eval(run_dir: Path, which: str, device: torch.device):
    """(model, the checkpoint's config, checkpoint folder, tokenizer), checking that they belong together:
    the tokenizer must be the one that made the run's tokens and the one the checkpoint was trained with."""
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist: pass --run RUN (a folder made by `antimatter train`)")
    try:
        model, run_cfg, ckpt = load_model(run_dir, which, device=device)
    except RuntimeError as e:  # load_state_dict: tensor shapes differ from the checkpoint's config
        first = str(e).strip().splitlines()[-1].strip()[:160]
        raise UserError(f"checkpoint '{which}' of {run_dir} does not match its config ({first}): "
                        f"use another checkpoint or retrain") from None
    saved = run_dir / "config.yaml"
    if saved.is_file():
        a, b = _model_shape(load_config(saved).model), _model_shape(run_cfg.model)
        diff = [f"model.{k} {a[k]} vs {b.get(k)}" for k in a if a[k] != b.get(k)]
        if diff:
            raise UserError(f"checkpoint {ckpt} does not match the run's config {saved} ({', '.join(diff[:3])}): "
                            f"evaluate it with the run it came from (--run) or pass a checkpoint of this run")
    tok = load_tokenizer(run_dir)
    if tok.vocab_size > run_cfg.model.vocab_size:
        raise UserError(f"the tokenizer of {run_dir} has {tok.vocab_size} tokens but checkpoint {ckpt} was built "
                        f"for {run_cfg.model.vocab_size}: evaluate it with the run (and tokenizer) it came from")
    if tok.path:  # byte counts and samples come from this tokenizer: it must be the one that made the tokens
        digest = sha256_file(tok.path)
        check_tokenizer(run_dir / "tokens", tok.path, digest)
        check_checkpoint_tokenizer(ckpt, tok.path, "evaluate", digest)
    return model, run_cfg, ckpt, tok


def unigram_counts(train_dir: Path, vocab_size: int, chunk: int = 1 << 24) -> tuple[np.ndarray, int]:
    """Token frequencies of the whole train split (streamed from the memory-mapped shards)."""
    shards = TokenShards(train_dir, vocab_size)
    counts = np.zeros(vocab_size, dtype=np.int64)
    with tqdm(total=shards.num_tokens, desc="unigram counts", unit="tok", unit_scale=True, leave=False) as bar:
        for arr in shards.arrays:
            for i in range(0, len(arr), chunk):
                part = np.asarray(arr[i: i + chunk])
                counts += np.bincount(part, minlength=vocab_size)[:vocab_size]
                bar.update(len(part))
    return counts, shards.num_tokens


def val_documents(val_dir: Path) -> list[tuple[str, str]]:
    """(source, text) of the prepared val split (data/val/*.jsonl[.zst]); empty if it is not there."""
    return [(str(rec.get("source") or "unknown"), rec["text"])
            for path in (split_files(val_dir) if val_dir.is_dir() else []) for rec, _ in iter_records(path)]


def sample_generations(model, tok, cfg: RunConfig) -> dict:
    """Completions of the configured prompts with the configured sampling settings (seeded)."""
    s = cfg.eval.sample
    prompts = [p for p in cfg.eval.prompts if p]
    outs = continue_texts(model, tok, prompts, s)
    return {
        "settings": {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_k": s.top_k,
                     "top_p": s.top_p, "repetition_penalty": s.repetition_penalty},
        "seed": s.seed,
        "samples": [{"prompt": p, "completion": tok.decode(o), "new_tokens": len(o)}
                    for p, o in zip(prompts, outs)],
    }


# -------------------------------------------------------------------------------------------- run_eval


@dataclass
class Evaluation:
    """What the sections of one `run_eval` share: the checked model, tokenizer and checkpoint, the window
    geometry, and the val tokens that are scored (`stream`: the first tokens of `shards`)."""

    run_dir: Path
    ev: EvalConfig
    which: str
    device: torch.device
    model: GPT
    tok: Tokenizer
    ckpt: Path
    seq_len: int
    stride: int
    byte_lens: np.ndarray
    shards: TokenShards | None  # None: only --data files are scored
    stream: np.ndarray
    data_dir: Path | None = None  # the prepared data of the run (RUN/data, or its data.prepared)

    @property
    def complete_split(self) -> bool:
        return len(self.stream) == self.shards.num_tokens

    def score(self, model: GPT, desc: str) -> Score:
        return score_sequences(model, [self.stream], self.seq_len, self.stride, self.byte_lens,
                               batch_size=self.ev.batch_size, dtype=self.ev.dtype, desc=desc)


def _start(ev: EvalConfig, run_dir: Path, which: str, data_files: list[str] | None, val: bool = True) -> Evaluation:
    """Load and check the checkpoint, its tokenizer and every --data file; read the val tokens to score
    (`val`: False when only the --data files are scored)."""
    check_settings(ev)
    device = pick_device(ev.device, setting="eval.device")
    model, run_cfg, ckpt, tok = load_for_eval(run_dir, which, device)
    for path in data_files or []:  # check every file before the long work starts
        read_documents(path, ev.text_field)
    seq_len, stride = score_windows(run_cfg, model.cfg.block_size, ev)
    byte_lens = token_byte_lengths(tok, model.cfg.vocab_size)
    data_dir = run_cfg.data_dir_of(run_dir)
    if not val:
        return Evaluation(run_dir, ev, which, device, model, tok, ckpt, seq_len, stride, byte_lens, None,
                          np.zeros(0, dtype=np.int64), data_dir)
    val_dir = run_dir / "tokens" / "val"
    shards = TokenShards(val_dir, model.cfg.vocab_size)
    n = shards.num_tokens if ev.max_eval_tokens <= 0 else min(shards.num_tokens, ev.max_eval_tokens + 1)
    if n < 2:
        raise UserError(f"{val_dir} holds {shards.num_tokens} tokens, too few to evaluate: add data or raise "
                        f"data.val_fraction, then re-run prepare and tokenize")
    return Evaluation(run_dir, ev, which, device, model, tok, ckpt, seq_len, stride, byte_lens, shards,
                      shards.read(0, n), data_dir)


def _int8_scores(e: Evaluation, score: Score) -> tuple[dict, GPT]:
    """The same targets through a weight-only int8 copy: what quantisation costs in perplexity."""
    qmodel = int8_copy(e.model)
    q = e.score(qmodel, "val perplexity, int8 weights")
    return {**q.to_dict(), "perplexity_change_pct": 100 * (q.perplexity / score.perplexity - 1),
            "method": INT8_METHOD}, qmodel


def _unigram_baseline(e: Evaluation) -> dict:
    """The perplexity of train-split token frequencies on the same val targets."""
    train_dir = e.run_dir / "tokens" / "train"
    if not any(train_dir.glob("*.bin")):
        return {"unigram_skipped": "no train token shards in this run (tokens/train/*.bin) to count frequencies"}
    V = e.model.cfg.vocab_size
    counts, n_train = unigram_counts(train_dir, V)
    uni = unigram_score(counts, [e.stream], e.byte_lens)
    return {"unigram_loss": uni.loss, "unigram_perplexity": uni.perplexity,
            "unigram_bits_per_byte": uni.bits_per_byte, "unigram_train_tokens": n_train,
            "unigram_method": "p(t) = (train count of t + 1) / (train tokens + V), add-one smoothed "
                              f"over V = {V}; scored on the same val targets"}


def _val_section(e: Evaluation) -> tuple[dict, Score, GPT | None]:
    """Val loss, perplexity and bits per byte (and those of an int8 copy, the unigram baseline and the
    split's byte count from meta.json); returns (the section, the score, the int8 copy or None)."""
    score = e.score(e.model, "val perplexity")
    val: dict[str, Any] = {**score.to_dict(), "seq_len": e.seq_len, "stride": e.stride,
                           "dtype": resolve_dtype(e.ev.dtype, e.device, "eval.dtype"),
                           "tokens_available": e.shards.num_tokens, "complete_split": e.complete_split,
                           "tokens_sha256": tokens_sha256(e.stream),
                           "byte_count_method": BYTE_COUNT_METHOD}
    qmodel = None
    if e.ev.int8:
        val["int8"], qmodel = _int8_scores(e, score)
    meta = read_meta(e.run_dir / "tokens")
    if meta is not None and e.complete_split:
        meta_bytes = ((meta.get("splits") or {}).get("val") or {}).get("bytes")
        if meta_bytes is not None:
            val["bytes_of_split_meta_json"] = meta_bytes
            val["bytes_of_split_from_tokens"] = int(e.byte_lens[e.stream].sum())
    if e.ev.unigram:
        val.update(_unigram_baseline(e))
    return val, score, qmodel


def _by_source(e: Evaluation) -> dict | None:
    """Bits per byte of the prepared val documents per source, when there is more than one source."""
    docs = val_documents((e.data_dir or e.run_dir / "data") / "val")
    if len({src for src, _ in docs}) <= 1:
        return None
    return score_by_source(e.model, e.tok, docs, e.seq_len, e.stride, e.byte_lens, max_tokens=e.ev.max_eval_tokens,
                           batch_size=e.ev.batch_size, dtype=e.ev.dtype)


def _continuation_section(e: Evaluation) -> dict:
    """Continuation quality on val documents, taken from the whole split (up to CONTINUATION_SCAN_TOKENS),
    not only its scored part."""
    ev, n, total = e.ev, len(e.stream), e.shards.num_tokens
    doc_stream = e.stream if e.complete_split else e.shards.read(0, min(total, max(n, CONTINUATION_SCAN_TOKENS)))
    sampled = ev.continuation_temperature > 0
    return evaluate_continuations(
        e.model, e.tok, doc_stream, n_docs=ev.continuation_docs, prefix_tokens=ev.prefix_tokens,
        continuation_tokens=ev.continuation_tokens, seed=ev.seed, temperature=ev.continuation_temperature,
        top_k=ev.sample.top_k if sampled else 0, top_p=ev.sample.top_p if sampled else 1.0,
        batch_size=ev.batch_size)


def _speed_size_plots(e: Evaluation, qmodel: GPT | None, val: dict, score: Score) -> dict:
    ev, out = e.ev, {}
    if ev.speed:
        for key, m in (("speed", e.model), ("speed_int8", qmodel)):
            if m is not None:
                out[key] = measure_speed(m, prompt_tokens=ev.speed_prompt_tokens, new_tokens=ev.speed_new_tokens,
                                         batch_sizes=(1, max(1, ev.speed_batch)), dtype=ev.dtype, seed=ev.seed,
                                         compile=ev.speed_compile)
    out["size"] = model_size(e.model, e.ckpt)
    if ev.plots:
        step = _manifest(e.ckpt).get("step")
        out["plots"] = plot_training(e.run_dir / "logs" / "metrics.jsonl", e.run_dir / PLOTS_DIR, e.run_dir.name,
                                     baseline=val.get("unigram_perplexity"),
                                     final=(step, score.loss) if step is not None else None)
    return out


def _manifest(ckpt: Path) -> dict:
    path = ckpt / "manifest.json"
    return json.loads(path.read_text("utf-8")) if path.is_file() else {}


def tokens_sha256(stream: np.ndarray) -> str:
    """The sha256 of scored token ids (as little-endian uint32, whatever the shards' dtype): two evaluations
    scored the same val targets exactly when these match."""
    return hashlib.sha256(np.asarray(stream, dtype="<u4").tobytes()).hexdigest()


def _checkpoint_identity(ckpt: Path) -> dict:
    """The step and the sha256 of the manifest (which lists every file's sha256): what the pipeline compares
    to decide whether final_evaluation.json still belongs to the checkpoint."""
    path = ckpt / "manifest.json"
    return {"step": _manifest(ckpt).get("step"), "manifest_sha256": sha256_file(path) if path.is_file() else None}


def _provenance_section(e: Evaluation, result: dict, prov: dict) -> dict:
    """Which checkpoint, model, tokenizer, data and settings the figures belong to."""
    manifest, weights = _manifest(e.ckpt), e.ckpt / "model.safetensors"
    meta_path = e.run_dir / "tokens" / "meta.json"
    tok = e.tok
    data: dict[str, Any] = {}
    if e.shards is not None:
        data["val_shards"] = {f.name: sha256_file(f) for f in e.shards.files}
    data["tokens_meta_sha256"] = sha256_file(meta_path) if meta_path.is_file() else None
    data["files"] = {f["path"]: f["sha256"] for f in result.get("files", [])}
    return {
        "checkpoint": {"path": str(e.ckpt), "requested": e.which, "step": manifest.get("step"),
                       "tokens_seen": manifest.get("tokens_seen"), "train_val_loss": manifest.get("val_loss"),
                       "sha256": sha256_file(weights) if weights.is_file() else None,
                       "manifest_sha256": _checkpoint_identity(e.ckpt)["manifest_sha256"]},
        "model": {**_model_shape(e.model.cfg), "preset": e.model.cfg.preset, "seq_len": e.seq_len},
        "tokenizer": {"path": str(tok.path), "sha256": sha256_file(tok.path) if tok.path else None,
                      "vocab_size": tok.vocab_size, "eot_id": tok.eot_id},
        "data": data,
        "settings": config_to_dict(e.ev),
        "provenance": {**prov, "torch": torch.__version__},
    }


def _json_round_trip(d: Any) -> Any:
    return json.loads(json.dumps(d, ensure_ascii=False))


def evaluation_is_current(cfg: RunConfig, run_dir: Path) -> str | None:
    """Why the run's final_evaluation.json still holds, in a few words (None: evaluate again): it was made from
    the checkpoint `cfg.eval.checkpoint` names now (same step and manifest sha256), with the same eval settings
    and the same tokens/meta.json. Reads only small files: deciding costs milliseconds."""
    run_dir = Path(run_dir)
    try:
        done = json.loads((run_dir / EVAL_FILE).read_text("utf-8"))
        ckpt = resolve_checkpoint(run_dir, cfg.eval.checkpoint)
        now = _checkpoint_identity(ckpt)
    except (OSError, ValueError, RecursionError, CheckpointError):
        return None
    if not isinstance(done, dict) or now["manifest_sha256"] is None:
        return None
    meta = run_dir / "tokens" / "meta.json"
    if (_dig(done, ("checkpoint", "manifest_sha256")) != now["manifest_sha256"]
            or _dig(done, ("checkpoint", "step")) != now["step"]
            or done.get("settings") != _json_round_trip(config_to_dict(cfg.eval))
            or _dig(done, ("data", "tokens_meta_sha256")) != (sha256_file(meta) if meta.is_file() else None)):
        return None
    return f"checkpoint {ckpt.name} was evaluated on {_dig(done, ('provenance', 'date'))}"


def run_eval(cfg: RunConfig, run_dir: Path, checkpoint: str | None = None,
             data_files: list[str] | None = None) -> dict:
    """Evaluate a run and return what was written. `cfg.eval` holds the settings; the model shape, tokenizer
    and context come from the checkpoint.

    Without `data_files`: the full evaluation, kept as its own history file and copied to
    final_evaluation.json (and its samples to sample_generations.json). With `data_files`: only those files
    are scored, into a history file of their own; final_evaluation.json and the samples are not touched."""
    if data_files:
        return score_data_files(cfg, run_dir, data_files, checkpoint)
    started = time.time()
    e = _start(cfg.eval, Path(run_dir), checkpoint or cfg.eval.checkpoint, None)
    val, score, qmodel = _val_section(e)
    result: dict[str, Any] = {"kind": "full", "run": str(e.run_dir), "val": val}
    if e.ev.by_source and (by_source := _by_source(e)) is not None:
        val["by_source"] = by_source
    torch.manual_seed(e.ev.seed)
    result["continuation"] = _continuation_section(e)
    samples = sample_generations(e.model, e.tok, cfg)
    result.update(_speed_size_plots(e, qmodel, val, score))
    prov = provenance(e.device)
    result.update(_provenance_section(e, result, prov))
    stem = _history_name(e.run_dir, result["checkpoint"]["step"])
    result["outputs"] = {"evaluation": str(e.run_dir / EVAL_FILE), "history": str(e.run_dir / EVAL_DIR / f"{stem}.json"),
                         "samples": str(e.run_dir / SAMPLES_FILE),
                         "samples_history": str(e.run_dir / SAMPLES_DIR / f"{stem}.json"),
                         "plots": result.get("plots", {}).get("plots", [])}
    result["seconds"] = round(time.time() - started, 2)
    result = {k: result[k] for k in RESULT_ORDER if k in result}
    samples = {**samples, "checkpoint": str(e.ckpt), "provenance": prov}
    # the history first, then the latest copies: a crash in between leaves the earlier latest whole
    _write_json(e.run_dir / SAMPLES_DIR / f"{stem}.json", samples)
    _write_json(e.run_dir / EVAL_DIR / f"{stem}.json", result)
    _write_json(e.run_dir / SAMPLES_FILE, samples)
    _write_json(e.run_dir / EVAL_FILE, result)
    print_eval_summary(result)
    return result


def score_data_files(cfg: RunConfig, run_dir: Path, data_files: list[str], checkpoint: str | None = None) -> dict:
    """`antimatter eval --data FILE ...`: loss, perplexity and bits per byte of those files under the
    checkpoint, written to a history file of their own (STAMP_stepNNNNNN_files.json) and printed."""
    started = time.time()
    e = _start(cfg.eval, Path(run_dir), checkpoint or cfg.eval.checkpoint, data_files, val=False)
    result: dict[str, Any] = {"kind": "files", "run": str(e.run_dir)}
    result["files"] = score_files(e.model, e.tok, data_files, e.seq_len, e.stride, e.byte_lens,
                                  batch_size=e.ev.batch_size, dtype=e.ev.dtype, text_field=e.ev.text_field)
    result.update(_provenance_section(e, result, provenance(e.device)))
    path = e.run_dir / EVAL_DIR / f"{_history_name(e.run_dir, result['checkpoint']['step'], '_files')}.json"
    result["outputs"] = {"evaluation": str(path)}
    result["seconds"] = round(time.time() - started, 2)
    result = {k: result[k] for k in RESULT_ORDER if k in result}
    _write_json(path, result)
    print_files_summary(result)
    return result


def print_files_summary(result: dict) -> None:
    """The scores of `eval --data` files and where they were saved, for the terminal."""
    t = Table(title=f"{result['run']} (step {result['checkpoint']['step']}) on --data files")
    for col in ("file", "loss", "perplexity", "bits per byte", "tokens"):
        t.add_column(col, justify="left" if col == "file" else "right")
    for f in result["files"]:
        t.add_row(Path(f["path"]).name, f"{f['loss']:.4f}", f"{f['perplexity']:.2f}", f"{f['bits_per_byte']:.4f}",
                  f"{f['tokens']:,}")
    console = Console(stderr=False)
    console.print(t)
    console.print(f"results: {result['outputs']['evaluation']}", soft_wrap=True, markup=False, highlight=False)


def print_eval_summary(result: dict) -> None:
    """The evaluation's headline numbers and where its files are, for the terminal."""
    v = result["val"]
    t = Table(title=f"evaluation of {result['run']} (step {result['checkpoint']['step']})", show_header=False)
    t.add_row("val loss", f"{v['loss']:.4f} nats/token over {v['tokens']:,} tokens")
    t.add_row("val perplexity", f"{v['perplexity']:.2f}" + (f"   (unigram baseline {v['unigram_perplexity']:.1f})"
                                                           if "unigram_perplexity" in v else ""))
    t.add_row("bits per byte", f"{v['bits_per_byte']:.4f}")
    if "int8" in v:
        t.add_row("int8 weights", f"perplexity {v['int8']['perplexity']:.2f} "
                                  f"({v['int8']['perplexity_change_pct']:+.3f}%)")
    for f in result.get("files", []):
        t.add_row(Path(f["path"]).name, f"loss {f['loss']:.4f}  ppl {f['perplexity']:.2f}  bpb {f['bits_per_byte']:.4f}")
    c = result.get("continuation", {})
    if "bleu" in c:
        t.add_row("continuations", f"BLEU {c['bleu']:.2f}  ROUGE-L {c['rouge_l_f1']:.3f}  "
                                   f"distinct-2 {c['distinct_2']:.3f}  ({c['documents']} docs)")
    s = result.get("speed")
    if s:
        compiled = s.get("compiled_decode_tokens_per_s_batch1")
        t.add_row("speed", f"decode {s['decode_tokens_per_s_batch1']:.0f} tok/s at batch 1 ({s['decode_path']}), "
                           f"TTFT {1000 * s['time_to_first_token_s']:.1f} ms on {s['device']}"
                           + (f"; compiled ({s['compiled_decode_path']}) {compiled:.0f} tok/s" if compiled else ""))
    s = result.get("speed_int8")
    if s:
        t.add_row("speed, int8", f"decode {s['decode_tokens_per_s_batch1']:.0f} tok/s at batch 1")
    console = Console(stderr=False)
    console.print(t)
    out = result["outputs"]
    console.print(f"results: {out['evaluation']}", soft_wrap=True, markup=False, highlight=False)
    console.print(f"samples: {out['samples']}", soft_wrap=True, markup=False, highlight=False)
    if out["plots"]:
        console.print(f"plots:   {Path(out['plots'][0]).parent}/ ({len(out['plots'])} PNG)", soft_wrap=True,
                      markup=False, highlight=False)


# ------------------------------------------------------------------------------------------- compare

COMPARE_ROWS = (
    ("step", ("checkpoint", "step"), "{}"),
    ("params", ("size", "params_total"), "{:,}"),
    ("val loss", ("val", "loss"), "{:.4f}"),
    ("val perplexity", ("val", "perplexity"), "{:.2f}"),
    ("val bits/byte", ("val", "bits_per_byte"), "{:.4f}"),
    ("val perplexity, int8", ("val", "int8", "perplexity"), "{:.2f}"),
    ("unigram perplexity", ("val", "unigram_perplexity"), "{:.1f}"),
    ("top-1 accuracy", ("val", "top1_accuracy"), "{:.3f}"),
    ("val tokens", ("val", "tokens"), "{:,}"),
    ("BLEU", ("continuation", "bleu"), "{:.2f}"),
    ("ROUGE-L F1", ("continuation", "rouge_l_f1"), "{:.3f}"),
    ("distinct-2", ("continuation", "distinct_2"), "{:.3f}"),
    ("repetition (4-gram)", ("continuation", "repetition_rate_4gram"), "{:.3f}"),
    ("decode tok/s (batch 1)", ("speed", "decode_tokens_per_s_batch1"), "{:.0f}"),
    ("time to first token (s)", ("speed", "time_to_first_token_s"), "{:.4f}"),
    ("device", ("provenance", "device"), "{}"),
    ("git commit", ("provenance", "git_commit"), "{}"),
    ("date", ("provenance", "date"), "{}"),
)


def _dig(d: dict, keys: tuple[str, ...]):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def _malformed(result: Any) -> str | None:
    """The first entry of a loaded result that the table cannot show (None: all fine). A file edited by hand
    or written by another tool is named in one line, not a traceback or a silently empty cell."""
    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    def shown(keys: tuple, v: Any) -> str:
        return f"{'.'.join(map(str, keys))} is {shorten(repr(v))}"

    if not isinstance(result, dict):
        return f"a JSON {_JSON_TYPES.get(type(result), 'null')}, not an object"
    for _, keys, fmt in COMPARE_ROWS:
        node: Any = result
        for i, k in enumerate(keys):
            if node is None:  # a section or metric this evaluation did not measure: shown as "-"
                break
            if not isinstance(node, dict):
                return shown(keys[:i], node)
            node = node.get(k)
        if node is not None and fmt != "{}" and not number(node):
            return shown(keys, node)
    by_source = _dig(result, ("val", "by_source"))
    if not isinstance(by_source, dict | None):
        return shown(("val", "by_source"), by_source)
    for src, entry in (by_source or {}).items():
        if not isinstance(entry, dict) or not (entry.get("bits_per_byte") is None or number(entry["bits_per_byte"])):
            return shown(("val", "by_source", src), entry)
    files = result.get("files", [])
    if not isinstance(files, list):
        return shown(("files",), files)
    for i, f in enumerate(files):
        if not isinstance(f, dict):
            return shown((f"files[{i}]",), f)
        if not isinstance(f.get("path"), str):
            return shown((f"files[{i}]", "path"), f.get("path"))
        if not number(f.get("bits_per_byte")):
            return shown((f"files[{i}]", "bits_per_byte"), f.get("bits_per_byte"))
    return None


def _history_files(run_dir: Path, result: dict) -> list[dict]:
    """The files scored by `eval --data` (history entries *_files.json) against the checkpoint `result` was
    made from, oldest first; a file scored twice appears twice (the later entry wins in the table)."""
    ident = _dig(result, ("checkpoint", "manifest_sha256"))
    if not ident or not (run_dir / EVAL_DIR).is_dir():
        return []
    out = []
    for path in sorted((run_dir / EVAL_DIR).glob("*_files.json")):
        try:
            entry = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError, RecursionError):
            continue  # the table shows what it can read; a damaged history entry does not hide the run
        if (isinstance(entry, dict) and _dig(entry, ("checkpoint", "manifest_sha256")) == ident
                and _malformed({"files": entry.get("files")}) is None):
            out += entry.get("files") or []
    return out


def _short(v: Any) -> str:
    return str(v)[:12] if v is not None else "unknown"


def comparability_warning(evals: list[tuple[str, dict]]) -> str | None:
    """One line naming what differs between the runs' val sets (the scored tokens' sha256 and count) or
    tokenizers (sha256), or None when they match: then their figures are measured on the same thing."""
    parts = []
    toks = [(name, _dig(e, ("tokenizer", "sha256"))) for name, e in evals]
    toks_differ = len({str(t) for _, t in toks}) > 1
    if toks_differ:
        parts.append("tokenizers (" + ", ".join(f"{n} sha256 {_short(t)}" for n, t in toks) + ")")
    hashed = all(isinstance(_dig(e, ("val", "tokens_sha256")), str) for _, e in evals)
    # an evaluation written before the scored tokens were hashed: its val shards' hashes stand in, but a
    # shard file's hash also covers its header (shards written before checksums have a zeroed one), so
    # shards that differ with the same token and byte counts are unverified, not different
    vals = [(name, _dig(e, ("val", "tokens_sha256")) if hashed else
             json.dumps(_dig(e, ("data", "val_shards")), sort_keys=True), _dig(e, ("val", "tokens")),
             _dig(e, ("val", "bytes"))) for name, e in evals]
    counts_differ = len({(str(n), str(b)) for _, _, n, b in vals}) > 1
    hashes_differ = len({str(h) for _, h, _, _ in vals}) > 1
    if counts_differ or (hashed and hashes_differ):
        parts.append("val sets (" + ", ".join(
            f"{name} {n:,} tokens" if isinstance(n, int) else f"{name} ? tokens" for name, _, n, _ in vals)
            + (", " + " vs ".join(f"sha256 {_short(h)}" for _, h, _, _ in vals) if hashed else "") + ")")
    if not parts:
        if hashes_differ:
            old = ", ".join(name for name, e in evals if not isinstance(_dig(e, ("val", "tokens_sha256")), str))
            return (f"note: {old} was evaluated before val tokens were hashed; the val sets have the same token "
                    f"and byte counts, but their shard files differ, so that they hold the same tokens is not "
                    f"verified (re-run `antimatter eval` to hash them)")
        return None
    if toks_differ:  # bits per byte is free of the tokenizer: it still compares where the val text is the same
        return (f"warning: these runs used different {' and '.join(parts)}: loss and perplexity are not "
                f"comparable; bits per byte is, if they scored the same val text")
    return f"warning: these runs used different {' and '.join(parts)}: their figures are not comparable"


def compare_runs(run_dirs: list[Path]) -> str:
    """A plain-text table with one column per run's final_evaluation.json (files scored with --data against
    the same checkpoint get a bits-per-byte row each), under one warning line when the runs used different
    tokenizers or val sets. Bits per byte compares fairly across tokenizers; perplexity does not."""
    if not run_dirs:
        raise UserError("no runs to compare: pass --compare RUN_A RUN_B ...")
    evals = []
    for r in map(Path, run_dirs):
        if not r.exists():
            raise UserError(f"--compare {r}: no such run folder or evaluation file: check the path")
        path = r / EVAL_FILE if r.is_dir() else r
        if not path.is_file():
            raise UserError(f"no final_evaluation.json for {r}: run `antimatter eval --run {r}` first")
        try:
            result = json.loads(path.read_text("utf-8"))
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past the parser's limit
            raise UserError(f"{path} is not valid JSON: re-run `antimatter eval --run {r}`") from None
        problem = _malformed(result)
        if problem:
            raise UserError(f"{path} is not an evaluation result ({problem}): re-run `antimatter eval --run {r}`")
        run_dir = r if r.is_dir() else r.parent.parent.parent
        result["files"] = [*result.get("files", []), *_history_files(run_dir, result)]
        evals.append((run_dir.name, result))
    warning = comparability_warning(evals)
    rows = [["metric", *[name for name, _ in evals]]]
    for label, keys, fmt in COMPARE_ROWS:
        vals = [_dig(e, keys) for _, e in evals]
        if all(v is None for v in vals):
            continue
        rows.append([label, *["-" if v is None else fmt.format(v) for v in vals]])
    sources = sorted({src for _, e in evals for src in e.get("val", {}).get("by_source", {})})
    for src in sources:
        vals = [_dig(e, ("val", "by_source", src, "bits_per_byte")) for _, e in evals]
        rows.append([f"val {src} bits/byte", *["-" if v is None else f"{v:.4f}" for v in vals]])
    file_names = sorted({Path(f["path"]).name for _, e in evals for f in e.get("files", [])})
    for fname in file_names:
        vals = [next((f["bits_per_byte"] for f in reversed(e.get("files", [])) if Path(f["path"]).name == fname),
                     None) for _, e in evals]
        rows.append([f"{fname} bits/byte", *["-" if v is None else f"{v:.4f}" for v in vals]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([warning, *lines] if warning else lines)
