"""Metadata from elsewhere (a downloaded Hugging Face folder, a copied checkpoint) is checked before anything is
built from it: sizes against the tensor shapes the weight files declare, shard paths against the folder, and
every malformed config ends in one error line, never a traceback or a multi-terabyte allocation."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_cli import assert_user_error
from train_helpers import one_thread, tiny_config

from antimatter import checkpoint as ck
from antimatter.config import preset_model
from antimatter.errors import UserError
from antimatter.export import export_model, import_hf, load_hf_model
from antimatter.model.gpt import GPT
from antimatter.provenance import sha256_file

assert one_thread  # the autouse fixture, imported so pytest uses it here

MEMORY_LIMIT = 4 << 30  # address space of the CLI subprocesses: far below what the bad configs would allocate


def hf_folder(tmp_path: Path, preset: str = "tiny", **over) -> Path:
    """A real export of a tiny model with random weights."""
    torch.manual_seed(0)
    return export_model(GPT(dataclasses.replace(preset_model(preset), **over)).eval(), tmp_path / "hf")


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def make_checkpoint(tmp_path: Path) -> Path:
    """A run folder with one real checkpoint of the tiny preset."""
    cfg = tiny_config(tmp_path / "run")
    torch.manual_seed(0)
    ck.save_checkpoint(tmp_path / "run" / "checkpoints", 1, GPT(cfg.model).state_dict(), {"step": 1}, cfg, best=True)
    return tmp_path / "run"


def replace_signed(ckpt: Path, fname: str, data: bytes) -> None:
    """Replace a checkpoint file and record it in the manifest: checksums catch damage, not a folder made
    elsewhere, so the loader must still distrust what the files say."""
    (ckpt / fname).write_bytes(data)
    manifest = json.loads((ckpt / ck.MANIFEST).read_text())
    manifest["files"][fname] = {"bytes": len(data), "sha256": sha256_file(ckpt / fname)}
    (ckpt / ck.MANIFEST).write_text(json.dumps(manifest))


def edit_checkpoint_model(run: Path, **changes) -> Path:
    ckpt = ck.resolve_checkpoint(run)
    data = yaml.safe_load((ckpt / ck.CONFIG).read_text())
    data["model"].update(changes)
    replace_signed(ckpt, ck.CONFIG, yaml.safe_dump(data, sort_keys=False).encode())
    return ckpt


def limited_cli(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    """`python -m antimatter.cli ARGS` in at most 4 GiB of address space, and how long it took: a loader that
    allocates what a config claims dies there instead of swapping the machine."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "antimatter.cli", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=90, preexec_fn=cap)
    return r, time.monotonic() - start


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------- sizes against the weights


@pytest.mark.parametrize("preset,changes,fragments", [
    ("tiny", {"n_embd": 1_000_000}, ["'transformer.wte.weight'", "(512, 32)", "(512, 1000000)"]),
    ("tiny", {"n_positions": 1_000_000_000}, ["'transformer.wpe.weight'", "(64, 32)", "(1000000000, 32)"]),
    ("llama-tiny", {"intermediate_size": 100_000_000},
     ["'model.layers.0.mlp.gate_proj.weight'", "(192, 64)", "(100000000, 64)"]),
    ("llama-tiny", {"max_position_embeddings": 1_000_000_000}, ["max_position_embeddings=1000000000"]),
    ("tiny", {"n_layer": 1_000_000}, ["n_layer=1000000", "'transformer.h.2."]),
], ids=["width", "positions", "ffn", "rope-positions", "layers"])
def test_import_of_huge_config_fails_fast_in_little_memory(tmp_path, preset, changes, fragments):
    hf = hf_folder(tmp_path, preset)
    edit_json(hf / "config.json", **changes)
    r, seconds = limited_cli("import", "--hf", str(hf), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert_user_error(r, "import", *fragments)
    assert seconds < 60 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("changes,fragments", [
    ({"n_layer": 1_000_000}, ["n_layer=1000000", "'transformer.h.2."]),
    ({"d_model": 1_000_000}, ["'transformer.wte.weight'", "(512, 32)", "(512, 1000000)"]),
    ({"vocab_size": 1_000_000_000}, ["'transformer.wte.weight'", "(512, 32)", "(1000000000, 32)"]),
], ids=["layers", "width", "vocab"])
def test_checkpoint_with_huge_config_fails_fast_in_little_memory(tmp_path, changes, fragments):
    run = make_checkpoint(tmp_path)
    edit_checkpoint_model(run, **changes)
    r, seconds = limited_cli("export", "--run", str(run), "--out", str(tmp_path / "hf"), cwd=tmp_path)
    assert_user_error(r, "export", *fragments)
    assert seconds < 60


def test_shape_mismatch_names_one_tensor_both_shapes_and_the_fix(tmp_path):
    hf = hf_folder(tmp_path)
    edit_json(hf / "config.json", n_inner=100)
    with pytest.raises(UserError) as e:
        load_hf_model(hf)
    msg = one_line(e)
    assert "'transformer.h.0.mlp.c_fc.weight'" in msg and "(32, 128)" in msg and "(32, 100)" in msg
    assert "config.json" in msg
    run = make_checkpoint(tmp_path)
    edit_checkpoint_model(run, d_ff=100)
    with pytest.raises(UserError) as e:
        ck.load_model(run)
    msg = one_line(e)
    assert "'transformer.h.0.mlp.c_fc.weight'" in msg and "(128, 32)" in msg and "(100, 32)" in msg
    assert "config.yaml" in msg


# ----------------------------------------------------------------------------------------- shard paths


def shard(hf: Path, second: str = "model-00002-of-00002.safetensors") -> tuple[Path, dict]:
    """Split the folder's model.safetensors into two shards plus an index naming them (the second as
    `second`, relative to the folder or absolute); returns the second shard's path and the index."""
    sd = load_file(str(hf / "model.safetensors"))
    (hf / "model.safetensors").unlink()
    names = sorted(sd)
    half = len(names) // 2
    first = "model-00001-of-00002.safetensors"
    save_file({k: sd[k] for k in names[:half]}, str(hf / first), metadata={"format": "pt"})
    path = Path(second) if Path(second).is_absolute() else hf / second
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: sd[k] for k in names[half:]}, str(path), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: first if i < half else second for i, k in enumerate(names)}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    return path, index


def test_sharded_weights_import_like_a_single_file(tmp_path):
    hf = hf_folder(tmp_path)
    whole = load_hf_model(hf)
    shard(hf, "shards/part-2.safetensors")
    parts = load_hf_model(hf)
    for (k, a), b in zip(whole.state_dict().items(), parts.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_shard_outside_the_folder_is_refused(tmp_path, where):
    hf = hf_folder(tmp_path)
    outside = tmp_path / "elsewhere" / "stolen.safetensors"
    if where == "absolute":
        shard(hf, str(outside))
    elif where == "dotdot":
        shard(hf, "../elsewhere/stolen.safetensors")
    else:
        shard(hf, str(outside))
        index = json.loads((hf / "model.safetensors.index.json").read_text())
        (hf / "link.safetensors").symlink_to(outside)
        index["weight_map"] = {k: "link.safetensors" if v == str(outside) else v
                               for k, v in index["weight_map"].items()}
        (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    assert outside.is_file()
    with pytest.raises(UserError, match=r"model\.safetensors\.index\.json names weight file .*, outside") as e:
        load_hf_model(hf)
    one_line(e)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"weight_map": ["a.safetensors"]}',
                                  '{"weight_map": {"x": 5}}', '{"metadata": {}}'])
def test_malformed_shard_index_is_one_line(tmp_path, text):
    hf = hf_folder(tmp_path)
    shard(hf)
    (hf / "model.safetensors.index.json").write_text(text)
    with pytest.raises(UserError, match=r"model\.safetensors\.index\.json (is not valid JSON|has no weight_map)") as e:
        load_hf_model(hf)
    one_line(e)


# ------------------------------------------------------------------------------------ malformed configs


BAD_HF_CONFIGS = {
    "n_head=0": ("tiny", lambda c: c.update(n_head=0), "n_head=0"),
    "n_head=3": ("tiny", lambda c: c.update(n_head=3), "n_head=3, which does not divide n_embd=32"),
    "list": ("tiny", lambda c: [c], "holds a JSON list, not a JSON object"),
    "missing n_embd": ("tiny", lambda c: c.pop("n_embd"), "config.json has no n_embd"),
    "string size": ("tiny", lambda c: c.update(n_layer="two"), "n_layer='two'"),
    "float size": ("tiny", lambda c: c.update(n_embd=32.5), "n_embd=32.5"),
    "string eps": ("tiny", lambda c: c.update(layer_norm_epsilon="small"), "layer_norm_epsilon='small'"),
    "nested architectures": ("tiny", lambda c: c.update(architectures=[["GPT2LMHeadModel"]]),
                             "architectures=[['GPT2LMHeadModel']]"),
    "string rope_scaling": ("llama-tiny", lambda c: c.update(rope_scaling="yarn"), "rope_scaling='yarn'"),
    "string rope_theta": ("llama-tiny", lambda c: c.update(rope_theta="fast"), "rope_theta='fast'"),
    "zero heads llama": ("llama-tiny", lambda c: c.update(num_attention_heads=0), "num_attention_heads=0"),
    "string tie": ("llama-tiny", lambda c: c.update(tie_word_embeddings="no"), "tie_word_embeddings='no'"),
    "huge padding": ("tiny", lambda c: c["antimatter"].update(pad_vocab_multiple=10**12),
                     "pad_vocab_multiple=1000000000000"),
}


@pytest.mark.parametrize("name", BAD_HF_CONFIGS)
def test_malformed_config_json_is_one_line(tmp_path, name):
    preset, edit, fragment = BAD_HF_CONFIGS[name]
    hf = hf_folder(tmp_path, preset)
    cfg = json.loads((hf / "config.json").read_text())
    replaced = edit(cfg)
    (hf / "config.json").write_text(json.dumps(replaced if isinstance(replaced, list) else cfg))
    with pytest.raises(UserError, match=re.escape(fragment)) as e:
        load_hf_model(hf)
    one_line(e)


@pytest.mark.parametrize("data", [b"\xff\xfe\x00garbage", b"[" * 100_000, b"NaN"])
def test_config_json_that_is_not_json_is_one_line(tmp_path, data):
    hf = hf_folder(tmp_path)
    (hf / "config.json").write_bytes(data)
    with pytest.raises(UserError, match=r"config\.json (is not valid JSON|holds a JSON number)") as e:
        load_hf_model(hf)
    one_line(e)


def test_cli_import_of_malformed_config_prints_one_line(tmp_path):
    hf = hf_folder(tmp_path)
    edit_json(hf / "config.json", n_head=0)
    r, _ = limited_cli("import", "--hf", str(hf), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert_user_error(r, "import", "n_head=0")
    assert not (tmp_path / "run").exists()


def test_valid_import_still_round_trips(tmp_path):
    hf = hf_folder(tmp_path, "llama-tiny")
    out = import_hf(hf, tmp_path / "run")
    model, cfg, _ = ck.load_model(out)
    assert cfg.model.qk_norm and cfg.model.n_kv_head == 2


BAD_YAML = {
    "not yaml": b"model: [unclosed\n",
    "a list": b"- model\n- train\n",
    "not utf-8": b"\xff\xfe\x00model: tiny\n",
    "model a number": b"model: 5\n",
    "nested too deep": b"model: " + b"[" * 100_000 + b"\n",
}


@pytest.mark.parametrize("name", BAD_YAML)
def test_unreadable_checkpoint_config_is_one_line(tmp_path, name):
    ckpt = ck.resolve_checkpoint(make_checkpoint(tmp_path))
    replace_signed(ckpt, ck.CONFIG, BAD_YAML[name])
    with pytest.raises(ck.CheckpointError, match=r"config\.yaml") as e:
        ck.load_model(ckpt)
    one_line(e)


@pytest.mark.parametrize("changes,fragment", [
    ({"n_head": 0}, "model.n_head=0"), ({"n_head": 3}, "model.n_head=3, which does not divide model.d_model=32"),
    ({"d_model": "wide"}, "model.d_model"), ({"n_layer": -1}, "model.n_layer=-1"),
    ({"n_kv_head": 0}, "model.n_kv_head=0"), ({"arch": "bert"}, "model.arch='bert'"),
], ids=["zero-heads", "indivisible", "string", "negative", "zero-kv", "arch"])
def test_malformed_checkpoint_model_section_is_one_line(tmp_path, changes, fragment):
    run = make_checkpoint(tmp_path)
    edit_checkpoint_model(run, **changes)
    with pytest.raises(ck.CheckpointError, match=re.escape(fragment)) as e:
        ck.load_model(run)
    assert "config.yaml" in one_line(e)


@pytest.mark.parametrize("files", [["model.safetensors"], {"model.safetensors": 5},
                                   {"../../outside.txt": {"bytes": 1, "sha256": "0"}}])
def test_malformed_manifest_is_one_line(tmp_path, files):
    ckpt = ck.resolve_checkpoint(make_checkpoint(tmp_path))
    manifest = json.loads((ckpt / ck.MANIFEST).read_text())
    manifest["files"] = files
    (ckpt / ck.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ck.CheckpointError, match=r"manifest\.json") as e:
        ck.load_model(ckpt)
    one_line(e)
