"""Execute every notebook in notebooks/ in place, so the committed notebooks carry the outputs of a real run.

    make notebooks                                   # = python scripts/run_notebooks.py
    python scripts/run_notebooks.py --run runs/my-run   # the run notebooks 03 and 04 read (default: the
                                                     # quickstart's run, made first when it is missing)

Notebooks 01 and 02 read the raw embedded corpus (the quickstart's default source); 03 and 04 read a finished
run. Each notebook is run top to bottom by a fresh kernel (nbclient) and written back with its outputs (plots
as PNG); a cell that raises stops the script with the notebook's name, and that notebook is left unchanged.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def ensure_run(run: Path) -> None:
    """Make the quickstart's run when the notebooks' run folder does not hold a finished one yet."""
    if (run / "results" / "evaluations").is_dir():
        return
    print(f"{run} has no evaluation yet: running the quickstart into it first", flush=True)
    cli = Path(sys.executable).with_name("antimatter")  # the console script beside this interpreter
    cmd = [str(cli), "quickstart", "--runs-dir", str(run.parent), "--name", run.name]
    subprocess.run(cmd, check=True, cwd=ROOT)


def execute(path: Path, env: dict[str, str], timeout: int) -> float:
    """Run one notebook with a fresh kernel; write it back only when every cell succeeded."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    started = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
                   ).execute(env={**os.environ, **env})  # the kernel's environment (start_kernel's Popen)
    nbformat.write(nb, path)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "quickstart",
                        help="finished run for notebooks 03 and 04 (default: runs/quickstart, made when missing)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds a cell may take")
    parser.add_argument("names", nargs="*", help="notebook files to run (default: all in notebooks/)")
    args = parser.parse_args(argv)

    paths = [NOTEBOOKS / n for n in args.names] or sorted(NOTEBOOKS.glob("*.ipynb"))
    run = args.run.resolve()
    if any(p.name[:2] in ("03", "04") for p in paths):
        ensure_run(run)
    shown = run.relative_to(ROOT) if run.is_relative_to(ROOT) else run  # kernels run in ROOT: short paths
    env = {"ANTIMATTER_RUN": str(shown), "MPLBACKEND": "module://matplotlib_inline.backend_inline",
           "ANTIMATTER_NOTEBOOK_OUT": str(shown.parent / f"{run.name}-notebook-prepare")}
    for path in paths:
        seconds = execute(path, env, args.timeout)
        print(f"{path.relative_to(ROOT)}: executed in {seconds:.0f}s, outputs saved", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
