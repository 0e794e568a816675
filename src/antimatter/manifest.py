"""Stage manifests: what a stage read (with hashes), the config it ran with, what it wrote and how long it
took. A stage whose manifest matches its current inputs and config is skipped, so `pipeline` resumes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from antimatter.errors import UserError, shorten
from antimatter.files import STAGE_MARK, atomic_write_text, walk_entries
from antimatter.provenance import provenance, sha256_file

MANIFEST = "manifest.json"


def claim(out_dir: str | Path, stage: str) -> None:
    """Mark `out_dir` as written by `stage` before anything else goes in (a killed stage's half-written folder
    is still recognised as its own)."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / STAGE_MARK).write_text(stage + "\n", encoding="utf-8")


def owned_by(out_dir: str | Path, stage: str) -> bool:
    """True when `out_dir` is empty or was written by `stage` (its mark or its manifest say so): the only
    folders a stage may clear. Anything else may hold the user's files."""
    out_dir = Path(out_dir)
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return True
    try:
        if (out_dir / STAGE_MARK).read_text(encoding="utf-8").strip() == stage:
            return True
    except OSError:
        pass
    m = read_manifest(out_dir)
    return bool(m) and m.get("stage") == stage


def foreign_files(out_dir: str | Path) -> list[str]:
    """Files in a finished stage folder that its manifest does not list (the user's, added after the stage
    wrote it), relative to the folder. A folder without a readable manifest (half-written by a kill) has none:
    all of it is the stage's."""
    out_dir = Path(out_dir)
    m = read_manifest(out_dir)
    if not m or not isinstance(m.get("outputs"), dict):
        return []
    listed = {*m["outputs"], MANIFEST}
    return [rel for rel in (str(f.relative_to(out_dir)) for f in sorted(out_dir.rglob("*")) if f.is_file())
            if rel not in listed]


def hash_paths(paths: list[str | Path], root: str | Path | None = None,
               prune: Callable[[Path], bool] | None = None) -> dict[str, str]:
    """sha256 of every file under the given files/folders, keyed by path (relative to `root` if given).
    A stage folder contributes its manifest only: that already lists the hashes of what it wrote. Folders
    below a given one for which `prune` is true are left out (those prepare does not read)."""
    out: dict[str, str] = {}
    for p in map(Path, paths):
        if p.is_dir() and (p / MANIFEST).is_file():
            files = [p / MANIFEST]
        elif p.is_dir():  # what prepare reads: through links to folders too
            files = [f for f in walk_entries(p, prune=prune) if f.is_file()]
        elif p.is_file():
            files = [p]
        else:
            continue
        for f in files:
            key = str(f.relative_to(root)) if root is not None and f.is_relative_to(root) else str(f)
            out[key] = sha256_file(f)
    return out


def read_manifest(out_dir: str | Path) -> dict[str, Any] | None:
    """The manifest, or None where there is none a stage could have written (unreadable, not JSON, nested
    past the parser's recursion limit, or not a JSON object): such a folder is neither current nor owned."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # ValueError: bad JSON or bytes that are not UTF-8
        return None
    return m if isinstance(m, dict) else None


def is_current(out_dir: str | Path, stage: str, inputs: dict[str, str], config: dict[str, Any]) -> bool:
    """True when `out_dir` holds a complete run of `stage` on exactly these inputs and config."""
    m = read_manifest(out_dir)
    if not m or m.get("stage") != stage or m.get("inputs") != inputs or m.get("config") != config:
        return False
    outputs = m.get("outputs", {})
    if not isinstance(outputs, dict):  # an edited manifest: what it lists cannot be checked, so redo the stage
        return False
    return _changed_output(Path(out_dir), outputs) is None


def _changed_output(out_dir: Path, outputs: dict[str, Any]) -> tuple[Path, int | None, Any] | None:
    """(file, its size on disk or None when missing, the size the manifest lists) of the first listed output
    that is not as the stage wrote it; None when every one is."""
    for rel, size in outputs.items():
        f = out_dir / rel
        actual = f.stat().st_size if f.is_file() else None
        if actual is None or not isinstance(size, int) or actual != size:
            return f, actual, size
    return None


def verify_outputs(out_dir: str | Path, stage: str, fix: str = "") -> None:
    """Refuse a stage folder whose files are not the ones its manifest lists (a file cut, grown or gone after
    the stage wrote it): a consumer would otherwise read a shorter file as a complete one. No manifest (a
    folder the user made) is not checked. `fix` says how to write it again (default: the stage with --force)."""
    m = read_manifest(out_dir)
    if not m or not isinstance(m.get("outputs"), dict):
        return
    changed = _changed_output(Path(out_dir), m["outputs"])
    if changed:
        f, actual, size = changed
        listed = f"{size:,}" if isinstance(size, int) else shorten(repr(size))
        state = "is missing" if actual is None else f"is {actual:,} bytes where its manifest says {listed}"
        fix = fix or f"run `antimatter {stage} --force` to write it again"
        raise UserError(f"{f} {state}: it was cut or changed after `antimatter {stage}` wrote it; {fix}")


def write_manifest(out_dir: str | Path, stage: str, inputs: dict[str, str], config: dict[str, Any],
                   counts: dict[str, Any] | None = None, started: float | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the manifest last, atomically: its presence means the stage finished."""
    out_dir = Path(out_dir)
    outputs = {str(f.relative_to(out_dir)): f.stat().st_size
               for f in sorted(out_dir.rglob("*")) if f.is_file() and f.name != MANIFEST}
    m = {"stage": stage, "inputs": inputs, "config": config, "outputs": outputs,
         "counts": counts or {}, "seconds": round(time.time() - started, 3) if started else None,
         **provenance(), **(extra or {})}
    atomic_write_text(out_dir / MANIFEST, json.dumps(m, indent=2, sort_keys=False))
    return m
