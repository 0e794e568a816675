"""Benchmarks refuse options they do not know, before any GPU work: an unknown variant option used to run as
the plain variant, so a result could be filed under a name it did not measure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_decode_speed_rejects_an_unknown_variant_option():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_speed.py"), "--compile-modes",
                          "reduce-overhead+kernels", "reduce-overhead+kernels+merge"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2
    assert "reduce-overhead+kernels+merge: unknown option(s) merge" in run.stderr
    assert "known: attntune" in run.stderr
