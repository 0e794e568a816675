"""Where torch.compile and Triton keep what they built, so that the second start of the same model on the same
machine reuses it instead of compiling again.

Inductor caches its FX graphs, AOTAutograd graphs and autotuning results under TORCHINDUCTOR_CACHE_DIR (else
/tmp/torchinductor_<user>), Triton its kernels under TRITON_CACHE_DIR (else ~/.triton/cache). /tmp is emptied
at reboot on many machines and neither place is where a user looks, so AntiMatter points both at one folder:
$ANTIMATTER_CACHE/compile (default ~/.cache/antimatter/compile), unless the user already set the torch or
Triton variable (theirs wins). Deleting the folder clears it; the next start compiles from scratch.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "ANTIMATTER_CACHE"
INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"
TRITON_ENV = "TRITON_CACHE_DIR"


def cache_root() -> Path:
    """$ANTIMATTER_CACHE, else $XDG_CACHE_HOME/antimatter, else ~/.cache/antimatter."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "antimatter"


def use_compile_cache() -> Path:
    """Point inductor's and Triton's caches into cache_root()/compile (unless already set), before anything
    compiles; returns inductor's cache folder. Both libraries read the variables at each compile."""
    folder = cache_root() / "compile"
    os.environ.setdefault(INDUCTOR_ENV, str(folder))
    os.environ.setdefault(TRITON_ENV, str(Path(os.environ[INDUCTOR_ENV]) / "triton"))
    return Path(os.environ[INDUCTOR_ENV])


def describe(folder: Path) -> str:
    """One line for the log: where the cache is, how full, and how to clear it."""
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    size = sum(p.stat().st_size for p in files)
    state = f"{len(files):,} files, {size / 2**20:.0f} MiB" if files else "empty: this start compiles everything"
    return f"compile cache {folder} ({state}; delete the folder to clear it)"
