"""Checkpoints: round trip, atomic writes under SIGKILL, refusal of damaged or unsafe files, pruning."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from train_helpers import cli_env, cli_train, make_tokens, one_thread, tiny_config, write_config

from antimatter import checkpoint as ck
from antimatter.model.gpt import GPT
from antimatter.provenance import sha256_file
from antimatter.train.trainer import train

assert one_thread  # the autouse fixture, imported so pytest uses it here


def _save(tmp_path, step=3, best=False, keep_last=3, cfg=None):
    cfg = cfg or tiny_config(tmp_path / "run")
    torch.manual_seed(0)
    model = GPT(cfg.model)
    state = {"step": step, "tokens_seen": 100 * step, "rng": [torch.get_rng_state()], "data": {"pos": 1}}
    path = ck.save_checkpoint(tmp_path / "run" / "checkpoints", step, model.state_dict(), state, cfg,
                              best=best, keep_last=keep_last)
    return model, cfg, path


def test_round_trip_and_load_model(tmp_path):
    model, cfg, path = _save(tmp_path, best=True)
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "manifest.json", "model.safetensors",
                                                       "state.pt"]
    assert ck.read_pointer(path.parent, "latest") == "step_000003" == ck.read_pointer(path.parent, "best")
    loaded, cfg2, where = ck.load_model(tmp_path / "run")  # a run folder; also a step folder below
    assert where == path and not loaded.training and cfg2.model == cfg.model
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # tied weights stay tied
    assert ck.load_model(path, which="latest")[2] == path
    st = ck.load_train_state(path)
    assert st["step"] == 3 and st["rng"][0].dtype == torch.uint8 and st["data"] == {"pos": 1}


def test_tied_weights_stored_once_and_no_compile_prefix(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    compiled = torch.compile(GPT(cfg.model))  # lazily compiled: nothing runs, only the wrapper's names
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    path = ck.save_checkpoint(tmp_path / "ck", 1, compiled.state_dict(), {"step": 1}, cfg)
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    assert not any("_orig_mod" in k or k.startswith("module.") for k in keys)


def test_truncated_and_flipped_weights_are_refused(tmp_path):
    _, _, path = _save(tmp_path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match=r"model\.safetensors is truncated"):
        ck.load_model(path)
    flipped = bytearray(data)
    flipped[len(data) - 10] ^= 0x01
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ck.CheckpointError, match=r"model\.safetensors is corrupt \(sha256"):
        ck.load_model(path)
    flipped = bytearray(data)
    flipped[12] ^= 0x20  # in the header, which the loading (beside the hashing) reads first: still "corrupt"
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ck.CheckpointError, match=r"model\.safetensors is corrupt \(sha256"):
        ck.load_model(path)
    weights.write_bytes(data)
    ck.load_model(path)  # intact again: loads
    (path / "manifest.json").unlink()
    with pytest.raises(ck.CheckpointError, match="incomplete"):
        ck.load_model(path)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['AM_EVIL_MARKER']}",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    _, _, path = _save(tmp_path)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("AM_EVIL_MARKER", str(marker))
    with open(path / "state.pt", "wb") as f:
        pickle.dump({"step": _Evil()}, f)
    # an attacker can also rewrite the manifest: the unpickler itself must refuse
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["state.pt"] = {"bytes": (path / "state.pt").stat().st_size,
                                     "sha256": sha256_file(path / "state.pt")}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ck.CheckpointError, match=r"state\.pt was refused by torch.load\(weights_only=True\)"):
        ck.load_train_state(path)
    assert not marker.exists()


def test_keep_last_plus_best(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    sd = GPT(cfg.model).state_dict()
    root = tmp_path / "run" / "checkpoints"
    for step in range(1, 7):
        ck.save_checkpoint(root, step, sd, {"step": step}, cfg, best=step == 2, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(root)] == ["step_000002", "step_000005", "step_000006"]
    assert ck.read_pointer(root, "best") == "step_000002" and ck.read_pointer(root, "latest") == "step_000006"
    with pytest.raises(ck.CheckpointError, match="not found"):
        ck.resolve_checkpoint(root, "step_000001")
    with pytest.raises(ck.CheckpointError, match="no checkpoints found"):
        ck.load_model(tmp_path / "nowhere")


def test_sigkill_while_writing_checkpoint_resumes_from_previous(tmp_path):
    """The process is SIGKILLed halfway through writing step 8's checkpoint (after the weights,
    before the state); latest still names step 4, which verifies, and --resume auto finishes the run."""
    run = make_tokens(tmp_path / "run")
    cfg = tiny_config(run, max_steps=8, ckpt_interval=4)
    env = cli_env()
    env[ck.CRASH_ENV] = "8"
    r = cli_train(write_config(run, cfg), env=env)
    assert r.returncode == -9, r.stdout[-2000:]
    root = run / "checkpoints"
    assert (root / ".tmp_step_000008" / "model.safetensors").exists()  # the half-written one
    assert not (root / "step_000008").exists()
    assert ck.read_pointer(root, "latest") == "step_000004"
    ck.verify_checkpoint(root / "step_000004")
    summary = train(cfg, run)  # resume=auto
    assert summary["start_step"] == 4 and summary["steps"] == 8
    assert ck.read_pointer(root, "latest") == "step_000008" and not (root / ".tmp_step_000008").exists()


def test_a_pointer_naming_a_folder_outside_the_run_is_refused(tmp_path):
    """`checkpoints/latest` may only name a step folder of this run, never a path elsewhere."""
    from antimatter.errors import UserError

    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "latest").write_text("../../elsewhere\n")
    with pytest.raises(UserError, match=r"latest names '\.\./\.\./elsewhere', not a checkpoint folder of this run"):
        ck.find_resume(root)


def test_loading_weights_checks_only_the_files_it_reads(tmp_path):
    """load_model (eval, generate, export) and load_weights (init_from) read the weights (and config), not the
    optimizer state: a damaged, truncated or lost state.pt does not stop them, while resuming, which reads it,
    still refuses it."""
    _, _, path = _save(tmp_path)
    state = path / "state.pt"
    flipped = bytearray(state.read_bytes())
    flipped[len(flipped) // 2] ^= 0x01
    state.write_bytes(bytes(flipped))
    ck.load_model(path)
    with pytest.raises(ck.CheckpointError, match=r"state\.pt is corrupt \(sha256"):
        ck.load_train_state(path)
    state.write_bytes(bytes(flipped[:-1]))
    ck.load_model(path)
    with pytest.raises(ck.CheckpointError, match=r"state\.pt is truncated"):
        ck.load_train_state(path)
    state.unlink()
    ck.load_model(path)
    assert ck.load_weights(path, tie_embeddings=True)
    with pytest.raises(ck.CheckpointError, match=r"state\.pt is missing"):
        ck.load_train_state(path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])  # what they do read is still checked
    with pytest.raises(ck.CheckpointError, match=r"model\.safetensors is truncated"):
        ck.load_weights(path, tie_embeddings=True)
