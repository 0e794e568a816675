"""Where a figure came from: command, git commit, device, versions and date, attached to every result."""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from antimatter import __version__


@functools.cache
def git_commit() -> str:
    """The commit of the checkout the code runs from (with '-dirty' if it has local changes), or 'unknown'.
    ANTIMATTER_GIT_COMMIT overrides it, for copies of a checkout without its history (e.g. a GPU box)."""
    import os

    if os.environ.get("ANTIMATTER_GIT_COMMIT"):
        return os.environ["ANTIMATTER_GIT_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if len(sha) != 40 or any(c not in "0123456789abcdef" for c in sha):
            return "unknown"  # not a git checkout, or one with no commit yet
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: Any = None) -> str:
    """A human name for the device: the GPU's name, or the CPU model and core count."""
    import torch

    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available():
        idx = dev.index if dev is not None and dev.index is not None else torch.cuda.current_device()
        return f"{torch.cuda.get_device_name(idx)} (x{torch.cuda.device_count()})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"CPU {cpu} ({len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores)"


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def command_line() -> str:
    return " ".join(["antimatter" if Path(sys.argv[0]).name == "antimatter" else Path(sys.argv[0]).name,
                     *sys.argv[1:]])


def versions() -> dict[str, str]:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("tokenizers", "numpy", "transformers"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = getattr(mod, "__version__", "?")
    out["antimatter"] = __version__
    return out


def provenance(device: Any = None) -> dict[str, Any]:
    """The block every results file carries."""
    return {"command": command_line(), "git_commit": git_commit(), "device": device_name(device),
            "date": now_iso(), "versions": versions()}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
