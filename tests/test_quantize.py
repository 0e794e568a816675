"""Weight-only int8 (torchao): which layers convert, how close the logits stay, the compiled single-row path
on int8 weights, and the message when torchao is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_generate import make_model, prompt

from antimatter.errors import UserError
from antimatter.model.generate import generate
from antimatter.model.quantize import int8_copy, int8_weight_only, is_int8


def test_int8_converts_the_block_linears_only():
    model = make_model()
    x = torch.randint(0, model.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        ref = model(x)
    q = int8_copy(model)
    assert not is_int8(model.transformer.h[0].attn.c_attn.weight)  # the original is untouched
    linears = [m for m in q.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(is_int8(m.weight) for m in linears) == 4 * q.cfg.n_layer  # qkv, out, up, down per block
    assert not is_int8(q.lm_head.weight) and q.lm_head.weight is q.transformer.wte.weight  # still tied
    with torch.no_grad():
        out = q(x)
    rel = ((out - ref).norm() / ref.norm()).item()
    # changed (it is quantised), but by rounding only: 0.017-0.022 over eight seeds for this model (init 0.3)
    assert 0 < rel < 0.03, rel


def test_compiled_single_row_path_reads_int8_weights():
    """At batch 1 the compiled step runs the matmuls as reductions over the int8 values times the row
    scales (Linear's gemv path); its greedy tokens equal eager int8 decoding (torchao's own matmul)."""
    q = make_model()
    assert int8_weight_only(q) == 4 * q.cfg.n_layer
    p = [prompt(6, seed=3)]
    eager = generate(q, p, 10)
    assert generate(q, p, 10, compile=True) == eager
    torch._dynamo.reset()


def test_missing_torchao_says_how_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(UserError, match=r"needs torchao: pip install 'antimatter\[quant\]'"):
        int8_weight_only(make_model())


def test_commands_that_may_never_quantise_do_not_import_torchao():
    """torchao prints warnings when imported (on a CPU build of torch among others): the modules every eval,
    generate and command-line run loads import it only in the function that quantises."""
    mods = ["antimatter.cli", "antimatter.eval.report", "antimatter.model.generate", "antimatter.generate_cli",
            "antimatter.train.trainer", "antimatter.model.accel", "antimatter.model.quantize"]
    code = f"import importlib, sys\nfor m in {mods!r}: importlib.import_module(m)\n" \
           "print(sorted(k for k in sys.modules if k.split('.')[0] == 'torchao'))"
    src = str(Path(__file__).resolve().parents[1] / "src")  # this checkout's code, not an installed copy
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": src})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
