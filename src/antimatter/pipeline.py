"""Stage orchestration: each stage reads the previous stage's folder, writes its own and a manifest.

A stage whose manifest matches its inputs (hashes) and config is skipped, so `antimatter pipeline` resumes
where it stopped; `--force` redoes it. Training resumes from its own checkpoints instead; eval is skipped
while final_evaluation.json belongs to the checkpoint it would evaluate (and the same eval settings).

The CLI imports this module for every command, `--help` included: each stage's module (torch, or a second or
two of imports) is imported by the function that runs it.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from antimatter.config import RunConfig, config_to_dict, save_config
from antimatter.errors import UserError
from antimatter.files import exclusive_lock
from antimatter.manifest import (
    MANIFEST,
    claim,
    foreign_files,
    hash_paths,
    is_current,
    owned_by,
    read_manifest,
    verify_outputs,
    write_manifest,
)

STAGE_ORDER = ("prepare", "tokenizer", "tokenize", "train", "eval")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _source_fingerprints(cfg: RunConfig) -> dict[str, str]:
    """What the prepare stage reads. The embedded corpus is named by interpreter, budget and the shipped
    books' hash: hashing the whole standard library on every run would cost more than it protects."""
    from antimatter.data import default_corpus  # here: the stage's modules load when a stage runs
    from antimatter.data.sources import written_by_antimatter

    out: dict[str, str] = {}
    for src in cfg.data.sources:
        if src.path == "default" or src.format == "default":
            out["default"] = default_corpus.fingerprint(cfg.data.default_corpus_bytes)
            continue
        files = _source_paths(src.path)
        if not files:
            raise UserError(f"data source '{src.path}' does not exist: fix data.sources[].path")
        out.update(hash_paths(files, prune=written_by_antimatter))  # the run folders prepare skips too
    return out


def _stage_io(stage: str, cfg: RunConfig) -> tuple[Path, dict[str, str], dict[str, Any]]:
    run, data = cfg.run_dir, cfg.data_dir
    if stage == "prepare":
        conf = config_to_dict(cfg.data)
        del conf["prepared"]  # where the later stages read, not how to prepare: earlier manifests still match
        return run / "data", _source_fingerprints(cfg), conf
    if stage == "tokenizer" and cfg.tokenizer.from_:  # adopted: the file (source and sha256) is the input
        return run / "tokenizer", _adopted_source(cfg), {"from": cfg.tokenizer.from_}
    if stage == "tokenizer":
        conf = {**config_to_dict(cfg.tokenizer), "vocab_size": cfg.tokenizer_vocab_size}
        del conf["from"]  # learned: the manifests of runs made before `tokenizer.from` existed still match
        return run / "tokenizer", hash_paths([data], run), conf
    if stage == "tokenize":
        return run / "tokens", hash_paths([data, run / "tokenizer"], run), config_to_dict(cfg.tokenize)
    raise ValueError(stage)


def _adopted_source(cfg: RunConfig) -> dict[str, str]:
    """{the tokenizer.json that tokenizer.from names (absolute): its sha256}; refused when it lies in the
    run's own tokenizer folder, which the stage clears before it copies."""
    from antimatter.tokenizer import tokenizer_source  # here: the tokenizers library

    src = tokenizer_source(cfg.tokenizer.from_).resolve()
    own = (cfg.run_dir / "tokenizer").resolve()
    if src.is_relative_to(own):
        raise UserError(f"tokenizer.from: {src} is this run's own tokenizer, which the tokenizer stage rewrites: "
                        f"name the original (the folder or file it came from)")
    return hash_paths([src])


def _source_paths(path: str) -> list[Path]:
    """The file or folder a source names (`~` is the home folder, as where the source is read), or what its
    glob matches (sorted)."""
    path = os.path.expanduser(path)
    return [Path(path)] if Path(path).exists() else [Path(f) for f in sorted(glob.glob(path, recursive=True))]


def _refuse_overlap(out_dir: Path, cfg: RunConfig) -> None:
    """The output folder may not be, contain or sit inside an input: prepare clears its output folder."""
    out = out_dir.resolve()
    for src in cfg.data.sources:
        if src.path == "default" or src.format == "default":
            continue
        for p in _source_paths(src.path):
            p = p.resolve()
            if p == out or p.is_relative_to(out) or out.is_relative_to(p):
                beside = p.with_name(f"{p.name or 'data'}-prepared")  # neither inside the input nor holding it
                here = Path.cwd().resolve()
                beside = beside.relative_to(here) if beside.is_relative_to(here) else beside
                raise UserError(f"--out {out_dir} overlaps the input {src.path}: write the prepared data to a "
                                f"folder outside the inputs (e.g. --out {beside}); nothing was deleted")


def _refuse_sources_inside(cfg: RunConfig, run: Path) -> None:
    """A source may not be the run folder or lie inside it: prepare writes there (the run's config.yaml and
    train.lock too) and would read its own files as documents. A run folder below a source is skipped instead
    (data.sources._walk), so unlike `_refuse_overlap` this is one direction only."""
    folder = run.resolve()
    for src in cfg.data.sources:
        if src.path == "default" or src.format == "default":
            continue
        inside = next((p for p in _source_paths(src.path) if p.resolve().is_relative_to(folder)), None)
        if inside is not None:
            raise UserError(f"source '{src.name or src.path}': {inside} lies in {folder}, which this prepare "
                            f"writes (a run folder: its config.yaml, train.lock and data): it would read those as "
                            f"documents; put the run elsewhere (another --name or --runs-dir); nothing was read")


def _require(path: Path, what: str, command: str) -> None:
    if not path.exists():
        raise UserError(f"{what} not found at {path}: run `antimatter {command}` first (or `antimatter pipeline`)")


def _require_run_data(cfg: RunConfig) -> None:
    """The run's own prepared data (RUN/data), finished and intact, for the tokenizer and tokenize stages. A
    `data.prepared` folder instead was checked when the stage started (`check_prepared_folder`)."""
    if not cfg.data.prepared:
        _require(cfg.run_dir / "data" / "train", "prepared data", "prepare")
        verify_outputs(cfg.run_dir / "data", "prepare")


def check_prepared_folder(folder: Path) -> Path:
    """`folder`, when it is a folder `antimatter prepare --out` finished; else a one-line UserError saying what
    to run. Nothing in it is changed."""
    make = f"run `antimatter prepare PATH... --out {folder}` first"
    own_text = (f"if it holds your text, run `antimatter prepare {folder} --out {folder}-prepared` first and "
                f"pass --prepared {folder}-prepared")  # prepare refuses to write into its own input
    if folder.is_file():
        raise UserError(f"data.prepared: {folder} is a file, not a prepared folder: {own_text}")
    if not folder.is_dir():
        raise UserError(f"data.prepared: {folder} is not a folder: {make}, or name the folder it wrote")
    manifest = read_manifest(folder)
    if manifest is None:
        damaged = (folder / MANIFEST).exists()
        fix = make if damaged or not any(folder.iterdir()) else own_text
        raise UserError(f"data.prepared: {folder} is not a prepared folder (its {MANIFEST} "
                        f"{'is damaged' if damaged else 'is missing'}): {fix}")
    if manifest.get("stage") != "prepare":
        raise UserError(f"data.prepared: {folder} was written by `antimatter {manifest.get('stage')}`, not by "
                        f"`antimatter prepare`: name the folder `antimatter prepare --out` wrote")
    outputs = manifest.get("outputs")
    if not isinstance(outputs, dict) or not any(str(f).startswith("train/") for f in outputs):
        raise UserError(f"data.prepared: the {MANIFEST} of {folder} lists no training shards (train/...): "
                        f"{make.replace(' first', ' again')}")
    verify_outputs(folder, "prepare", fix=f"run `antimatter prepare PATH... --out {folder}` again")
    return folder


def run_stage(stage: str, cfg: RunConfig, force: bool = False, model_checked: bool = False) -> dict[str, Any]:
    """Run one stage of the run `cfg.run_dir`, unless its outputs are already current (`model_checked`: the
    pipeline already checked the run's model against the device)."""
    run = cfg.run_dir
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if stage != "train" and world > 1:
        raise UserError(f"the {stage} stage runs in one process: run `antimatter pipeline` (or the data stages) "
                        f"without torchrun first, then `torchrun ... -m antimatter.cli train`")
    if cfg.data.prepared and stage in ("prepare", "tokenizer", "tokenize"):
        check_prepared_folder(cfg.data_dir)  # refused before the run folder is made
    if stage == "prepare" and not cfg.data.prepared:
        _refuse_sources_inside(cfg, run)  # before the run folder is made in the user's source
    if int(os.environ.get("RANK", "0")) == 0:
        run.mkdir(parents=True, exist_ok=True)
        if stage != "train":  # the trainer saves it once the start is accepted: a refused one changes nothing
            save_config(cfg, run / "config.yaml")
    if stage == "train":
        _require(run / "tokens" / "meta.json", "token shards", "tokenize")
        if not model_checked:
            _check_default_model(cfg)
        from antimatter.train.trainer import train  # here: torch

        return train(cfg, run)
    if stage == "eval":
        from antimatter.eval.report import EVAL_FILE, evaluation_is_current, run_eval  # here: torch

        current = None if force else evaluation_is_current(cfg, run)
        if current:
            _log(f"[eval] up to date ({run / EVAL_FILE}: {current}); use --force to redo")
            return {"skipped": True}
        return run_eval(cfg, run)
    if stage == "prepare" and cfg.data.prepared:
        _log(f"[prepare] reading the prepared folder {cfg.data_dir} (data.prepared); nothing to prepare here")
        return {"skipped": True}
    if stage == "tokenizer" and not cfg.tokenizer.from_:  # an adopted tokenizer reads no data
        _require_run_data(cfg)
    if stage == "tokenize":
        _require(run / "tokenizer" / "tokenizer.json", "tokenizer", "tokenizer")
        _require_run_data(cfg)
        verify_outputs(run / "tokenizer", "tokenizer")
    out, inputs, conf = _stage_io(stage, cfg)
    if not force and is_current(out, stage, inputs, conf):
        _log(f"[{stage}] up to date ({out}); use --force to redo")
        return {"skipped": True}
    _refuse_to_clear(out, stage)
    if stage == "tokenizer" and out.exists():
        _refuse_to_orphan_checkpoints(run, "a new tokenizer")
    if stage == "prepare" and not cfg.tokenizer.from_ and out.exists():  # new data: a new tokenizer next
        _refuse_to_orphan_checkpoints(run, "new data (and so a new tokenizer)")
    started = time.time()
    _log(f"[{stage}] -> {out}")
    with exclusive_lock(run / "train.lock", f"run {run}"):  # not while a training reads this run's data
        counts = _build_stage(out, stage, inputs, conf, started, lambda new: _run_stage_into(stage, cfg, new, out))
    _log(f"[{stage}] done in {time.time() - started:.1f}s")
    return counts


def _refuse_to_clear(out: Path, stage: str) -> None:
    """A stage replaces only its own folder, and only when that holds nothing the user put there."""
    if not out.exists():
        return
    if not owned_by(out, stage):
        raise UserError(f"{out} holds files that `antimatter {stage}` did not write: move them away or use "
                        f"another run name (--name); nothing was deleted")
    foreign = foreign_files(out)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise UserError(f"{out} holds files that `antimatter {stage}` did not write ({', '.join(foreign[:3])}{more}): "
                        f"move them away, then run it again; nothing was deleted")


def _refuse_to_orphan_checkpoints(run: Path, change: str) -> None:
    """A new tokenizer for a run that has checkpoints would leave them unusable: each is evaluated, sampled
    and resumed with the tokenizer it was trained with, and no copy of it is kept elsewhere. New data in
    such a run (unless it adopts a tokenizer) leads there too, so it is refused before the data is replaced."""
    from antimatter.checkpoint import list_checkpoints  # here: torch

    found = list_checkpoints(run / "checkpoints")
    if found:
        raise UserError(f"{run} has checkpoints trained with its tokenizer (latest {found[-1].name}): {change} "
                        f"would leave them unusable; make it in a new run (--name NEW), or move "
                        f"{run / 'checkpoints'} away first; nothing was changed")


def _build_stage(out: Path, stage: str, inputs: dict[str, str], conf: dict[str, Any], started: float,
                 build: Callable[[Path], Any]) -> Any:
    """Run `build` into a new sibling folder of `out` and put it in `out`'s place only once it finished: a
    stage that fails (no document survives, a bad tokenizer file, a full disk, Ctrl-C) leaves the previous
    output as it was. The disk holds both until the swap."""
    new = out.with_name(f".{out.name}.new")
    _remove_own(new, stage)  # left by a killed earlier run
    claim(new, stage)
    try:
        counts = build(new)
        write_manifest(new, stage, inputs, conf, counts=_summary_counts(counts), started=started)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old")
    _remove_own(old, stage)
    if out.is_symlink() or out.exists():
        out.rename(old)
    new.rename(out)
    _remove_own(old, stage)
    return counts


def _remove_own(folder: Path, stage: str) -> None:
    """Delete a scratch folder of `stage` (a link is unlinked, not followed); anything else there is refused."""
    if folder.is_symlink():
        folder.unlink()
    elif folder.exists():
        if not owned_by(folder, stage):
            raise UserError(f"{folder} holds files that `antimatter {stage}` did not write: move it away; "
                            f"nothing was deleted")
        shutil.rmtree(folder)


def _run_stage_into(stage: str, cfg: RunConfig, out: Path, final: Path) -> Any:
    """The work of one data stage, written into `out` (the scratch folder that becomes `final`)."""
    if stage == "prepare":
        from antimatter.data.prepare import run_prepare  # here: 2 s of imports

        return run_prepare(cfg, out, shown_as=final)
    if stage == "tokenizer" and cfg.tokenizer.from_:
        from antimatter.tokenizer import adopt_tokenizer  # here: the tokenizers library

        return adopt_tokenizer(cfg, out)
    if stage == "tokenizer":
        from antimatter.tokenizer import train_tokenizer  # here: the tokenizers library

        return train_tokenizer(cfg, cfg.data_dir, out)
    from antimatter.tokens import run_tokenize  # here: 0.5 s of imports

    return run_tokenize(cfg, cfg.data_dir, cfg.run_dir / "tokenizer", out)


def _summary_counts(counts: Any) -> dict[str, Any]:
    """Keep the manifest small: top-level scalars of the stage's returned dict."""
    if not isinstance(counts, dict):
        return {}
    return {k: v for k, v in counts.items() if isinstance(v, int | float | str | bool)}


def _check_default_model(cfg: RunConfig) -> None:
    """No model chosen and a CPU: refused before any stage runs when it would take hours (train/estimate.py)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    from antimatter.train.estimate import check_default_model  # here: torch

    check_default_model(cfg, log=_log)


def run_pipeline(cfg: RunConfig, force: bool = False, stages: tuple[str, ...] = STAGE_ORDER) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if "train" in stages:  # before the data stages: a 50k-token tokenizer for a model that will not train
        _check_default_model(cfg)
    for stage in stages:
        results[stage] = run_stage(stage, cfg, force=force, model_checked=True)
        stopped = results[stage].get("stopped") if isinstance(results[stage], dict) else None
        if stage == "train" and stopped == "signal":
            _log("[pipeline] training was interrupted and saved a checkpoint; run the same command to resume")
            break
    return results


def cmd_prepare(cfg: RunConfig, paths: list[str], out: str | None, force: bool) -> int:
    """`antimatter prepare [PATH ...] [--out DIR]`: paths replace the config's sources."""
    if paths:
        from antimatter.data.sources import sources_from_paths  # here: 0.3 s of imports

        cfg.data.sources = sources_from_paths(paths)
    if out is None:
        run_stage("prepare", cfg, force=force)
        return 0
    from antimatter.data.prepare import output_lock, run_prepare  # here: 2 s of imports

    out_dir = Path(out)
    _refuse_overlap(out_dir, cfg)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file: give a folder for the prepared data (a new one is made); "
                        f"nothing was deleted")
    if not owned_by(out_dir, "prepare"):
        raise UserError(f"--out {out_dir} already holds files that `antimatter prepare` did not write: give an "
                        f"empty or new folder (prepare clears its own earlier output there); nothing was deleted")
    with output_lock(out_dir):  # the manifest too: a second prepare into it is refused until it is written
        claim(out_dir, "prepare")
        started = time.time()
        inputs = _source_fingerprints(cfg)
        counts = run_prepare(cfg, out_dir)
        write_manifest(out_dir, "prepare", inputs, config_to_dict(cfg.data), counts=_summary_counts(counts),
                       started=started)
    return 0


# ------------------------------------------------------------------------------------------ quickstart


def quickstart_config_path() -> Path:
    return Path(str(resources.files("antimatter") / "presets" / "quickstart.yaml"))


def quickstart(cfg: RunConfig, force: bool = False) -> int:
    """The whole pipeline, then a short summary; `cfg` is loaded from quickstart_config_path() (the embedded
    corpus, a tiny model) unless the user named another config."""
    started = time.time()
    results = run_pipeline(cfg, force=force)
    if "eval" not in results:
        return 1
    print_summary(cfg, time.time() - started)
    return 0


def print_summary(cfg: RunConfig, seconds: float) -> None:
    from rich.console import Console  # here: only the quickstart prints tables
    from rich.table import Table

    run = cfg.run_dir
    ev_path = run / "results" / "evaluations" / "final_evaluation.json"
    ev = json.loads(ev_path.read_text()) if ev_path.is_file() else {}
    console = Console(stderr=False)
    table = Table(title=f"AntiMatter quickstart: done in {seconds:.0f}s", show_header=False)
    table.add_row("run folder", str(run.resolve()))
    val = ev.get("val", ev)
    for label, key in (("val loss", "loss"), ("val perplexity", "perplexity"),
                       ("unigram perplexity (same val tokens)", "unigram_perplexity"),
                       ("bits per byte", "bits_per_byte")):
        if isinstance(val, dict) and key in val:
            table.add_row(label, f"{val[key]:.4g}")
    table.add_row("evaluation", str(ev_path))
    console.print(table)
    samples_path = run / "results" / "generated_samples" / "sample_generations.json"
    if samples_path.is_file():
        samples = json.loads(samples_path.read_text())
        for s in samples.get("samples", [])[:3]:
            console.rule(f"[bold]{s.get('prompt', '')}")
            console.print(s.get("prompt", "") + s.get("completion", s.get("output", "")), markup=False)
    console.print(f"next: antimatter generate --run {run}   (interactive)  |  "
                  f"antimatter export --run {run} --out {run}/hf")
