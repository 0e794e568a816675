"""The Triton decode kernels compile for a Hopper GPU (sm_90) on this machine, GPU or not: the interpreter that
runs them in the other CPU tests is more lenient than Triton's compiler, and a kernel that only the compiler
refuses would otherwise be found on the GPU (tests/compile_decode_kernels.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
SCRIPT = Path(__file__).with_name("compile_decode_kernels.py")


def ptxas_available() -> bool:
    import shutil

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return bundled.exists() or shutil.which("ptxas") is not None


@pytest.mark.skipif(not ptxas_available(), reason="no ptxas (NVIDIA's assembler) in this Triton install")
def test_every_decode_kernel_compiles_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = str(Path(__file__).parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    failed = [r for r in rows if not r["ok"]]
    assert not failed, "\n".join(f"{r['kernel']} {r['constexprs']}: {r['error']}" for r in failed)
    assert done.returncode == 0, done.stderr[-3000:]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"matvec_kernel", "matmul_kernel", "attend_kernel", "combine_kernel", "embed_kernel",
                       "greedy_kernel"}, kernels
