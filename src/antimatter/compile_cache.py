"""Where torch.compile and Triton keep what they built, so that the second start of the same model on the same
machine reuses it instead of compiling again.

Inductor caches its FX graphs, AOTAutograd graphs and autotuning results under TORCHINDUCTOR_CACHE_DIR (else
/tmp/torchinductor_<user>), Triton its kernels under TRITON_CACHE_DIR (else ~/.triton/cache). /tmp is emptied
at reboot on many machines and neither place is where a user looks, so AntiMatter points both at one folder:
$ANTIMATTER_CACHE/compile (default ~/.cache/antimatter/compile), unless the user already set the torch or
Triton variable (theirs wins). Deleting the folder clears it; the next start compiles from scratch.

Python's own bytecode is the other cost of every start: torch, sympy and inductor are some 2,300 source files.
A normal install keeps their .pyc beside them; a read-only one (a container image, a shared install) cannot,
and then every process, inductor's compile workers included, compiles them again (6-10 s a start). When torch
has no bytecode beside it, the commands keep it in cache_root()/pycache; where PYTHONDONTWRITEBYTECODE forbids
any (many container images set it), they leave it so and say what it costs.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ENV = "ANTIMATTER_CACHE"
INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"
TRITON_ENV = "TRITON_CACHE_DIR"
PYCACHE_ENV = "PYTHONPYCACHEPREFIX"


def cache_root() -> Path:
    """$ANTIMATTER_CACHE, else $XDG_CACHE_HOME/antimatter, else ~/.cache/antimatter."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "antimatter"


def _inductor_default(value: str) -> bool:
    """Whether `value` is the folder inductor chose itself: once loaded, inductor writes its default
    (/tmp/torchinductor_<user>) into TORCHINDUCTOR_CACHE_DIR, which is then no choice of the user's."""
    utils = sys.modules.get("torch._inductor.runtime.cache_dir_utils")
    return utils is not None and value == os.path.abspath(utils.default_cache_dir())


def use_compile_cache() -> Path:
    """Point inductor's and Triton's caches into cache_root()/compile (unless the user set them), whether or
    not inductor has loaded; returns inductor's cache folder. Both libraries read the variables at each
    compile, so it is enough to call this before compiling."""
    current = os.environ.get(INDUCTOR_ENV)
    if current is None or _inductor_default(current):
        os.environ[INDUCTOR_ENV] = str(cache_root() / "compile")
    os.environ.setdefault(TRITON_ENV, str(Path(os.environ[INDUCTOR_ENV]) / "triton"))
    return Path(os.environ[INDUCTOR_ENV])


def use_bytecode_cache(package: str = "torch") -> Path | None:
    """Keep Python's bytecode in cache_root()/pycache when `package` has none beside its sources (pip writes
    it at install: an install without it is read-only, or was made without it); returns that folder, else
    None (nothing changed). Call it before `package` is imported; the environment variable carries it to
    child processes. A prefix the user set, or their choice to write no bytecode, is left as it is."""
    if sys.pycache_prefix or sys.dont_write_bytecode or has_bytecode(package):
        return None
    folder = cache_root() / "pycache"
    sys.pycache_prefix = os.environ[PYCACHE_ENV] = str(folder)
    return folder


def bytecode_note(package: str = "torch") -> str | None:
    """A line for the user whose environment forbids bytecode (PYTHONDONTWRITEBYTECODE, set by many container
    images) while `package` has none beside it: each start then compiles it all again, which they may not know."""
    if sys.pycache_prefix or not sys.dont_write_bytecode or has_bytecode(package):
        return None
    return (f"Python writes no bytecode here (PYTHONDONTWRITEBYTECODE is set) and {package} has none beside its "
            f"sources, so every start compiles its ~2,300 modules again (seconds each start): unset "
            f"PYTHONDONTWRITEBYTECODE and antimatter keeps them in {cache_root() / 'pycache'}")


def has_bytecode(package: str) -> bool:
    """Whether `package` has its .pyc beside its sources (a normal install: pip compiles them), or is no
    source package at all (then there is nothing to do)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return True
    return Path(importlib.util.cache_from_source(spec.origin)).is_file()


def cache_size(folder: Path) -> tuple[int, int]:
    """(files, bytes) in the cache folder; (0, 0) when it does not exist yet."""
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    return len(files), sum(p.stat().st_size for p in files)


def describe(folder: Path) -> str:
    """One line for the log: where the cache is, how full, and how to clear it."""
    files, size = cache_size(folder)
    state = f"{files:,} files, {size / 2**20:.0f} MiB" if files else "empty: this start compiles everything"
    return f"compile cache {folder} ({state}; delete the folder to clear it)"
