"""Stage manifests: what a stage read (with hashes), the config it ran with, what it wrote and how long it
took. A stage whose manifest matches its current inputs and config is skipped, so `pipeline` resumes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from antimatter.files import atomic_write_text
from antimatter.provenance import provenance, sha256_file

MANIFEST = "manifest.json"


def hash_paths(paths: list[str | Path], root: str | Path | None = None) -> dict[str, str]:
    """sha256 of every file under the given files/folders, keyed by path (relative to `root` if given).
    A stage folder contributes its manifest only: that already lists the hashes of what it wrote."""
    out: dict[str, str] = {}
    for p in map(Path, paths):
        if p.is_dir() and (p / MANIFEST).is_file():
            files = [p / MANIFEST]
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            files = [p]
        else:
            continue
        for f in files:
            key = str(f.relative_to(root)) if root is not None and f.is_relative_to(root) else str(f)
            out[key] = sha256_file(f)
    return out


def read_manifest(out_dir: str | Path) -> dict[str, Any] | None:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def is_current(out_dir: str | Path, stage: str, inputs: dict[str, str], config: dict[str, Any]) -> bool:
    """True when `out_dir` holds a complete run of `stage` on exactly these inputs and config."""
    m = read_manifest(out_dir)
    if not m or m.get("stage") != stage or m.get("inputs") != inputs or m.get("config") != config:
        return False
    return all((Path(out_dir) / rel).is_file() and os.path.getsize(Path(out_dir) / rel) == size
               for rel, size in m.get("outputs", {}).items())


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
