"""Checkpoints you can trust: atomic writes, checksummed files, safe loading.

A checkpoint is a folder `checkpoints/step_000123/` holding
  * `model.safetensors` - the full, unsharded weights of the uncompiled model (tied weights stored once),
  * `state.pt`          - optimiser, grad scaler, step, tokens seen, data position, RNG states of every rank,
  * `config.yaml`       - the resolved run config,
  * `manifest.json`     - size and sha256 of each file above (written last).
It is written into a hidden temp folder, every file fsynced, then renamed into place, and only then do the
`checkpoints/latest` / `checkpoints/best` pointer files (one line: the step folder's name) move, each by an
atomic rename. A crash at any instant leaves the previous checkpoint and a valid `latest`.

Loading checks every file against the manifest (truncation and flipped bits are refused, naming the file)
and unpickles `state.pt` only with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from antimatter.config import ModelConfig, RunConfig, config_from_dict, config_to_dict, yaml_load
from antimatter.errors import UserError, shorten
from antimatter.files import as_created_here
from antimatter.model.gpt import GPT
from antimatter.model.shapes import (
    check_model_config,
    first_difference,
    first_missing_layer,
    fmt_shape,
    meta_model,
    quote,
    safetensors_shapes,
)
from antimatter.provenance import now_iso, sha256_file

WEIGHTS, STATE, CONFIG, MANIFEST = "model.safetensors", "state.pt", "config.yaml", "manifest.json"
STEP_RE = re.compile(r"^step_(\d+)$")
# Test hook: when set to a step number, the process SIGKILLs itself halfway through writing that checkpoint.
CRASH_ENV = "ANTIMATTER_TEST_CRASH_IN_CHECKPOINT"


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete or damaged; the message names the file."""


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


# ------------------------------------------------------------------------------------------- writing


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_pointer(root: Path, name: str, target: str) -> None:
    """`root/name` <- target, atomically (temp file, fsync, rename, fsync folder)."""
    tmp = root / f".{name}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(target + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / name)
    _fsync_dir(root)


def read_pointer(root: Path, name: str) -> str | None:
    """The step folder that `root/name` (latest, best) names; it may only name a folder of this run."""
    try:
        value = (Path(root) / name).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    if value and not re.fullmatch(r"step_\d{6,}", value):
        raise UserError(f"{Path(root) / name} names {shorten(repr(value))}, not a checkpoint folder of this run "
                        f"(step_NNNNNN): fix it to the step you want, or delete it to use the newest checkpoint")
    return value or None


def weights_for_saving(model_state: dict[str, torch.Tensor], tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no `_orig_mod.`/`module.` prefixes, the tied lm_head dropped (safetensors stores
    each tensor once; `load_weights` puts the alias back)."""
    out = {}
    for k, v in model_state.items():
        k = k.replace("_orig_mod.", "").removeprefix("module.")
        if tie_embeddings and k == "lm_head.weight":
            continue
        out[k] = v.detach().to("cpu").contiguous()
    return out


def save_checkpoint(root: str | Path, step: int, model_state: dict[str, torch.Tensor], train_state: dict[str, Any],
                    cfg: RunConfig, *, best: bool = False, keep_last: int = 3) -> Path:
    """Write `root/step_XXXXXX` atomically, point `latest` (and `best` when `best`) at it, prune old ones.

    `model_state`: the full state dict of the uncompiled model (gathered on this process under FSDP).
    `train_state`: anything `torch.load(weights_only=True)` can read back (tensors, numbers, strings,
    lists, dicts). Call it on one process only (rank 0)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = step_name(step)
    tmp = root / f".tmp_{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    weights = weights_for_saving(model_state, cfg.model.tie_embeddings)
    try:
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt", "step": str(step)})
        as_created_here(tmp / WEIGHTS)
        if os.environ.get(CRASH_ENV) == str(step):  # test hook: die with a half-written checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save(train_state, tmp / STATE)
        (tmp / CONFIG).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
    except (OSError, RuntimeError, SafetensorError) as e:  # a full disk, said three ways
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the last complete checkpoint stays
        if isinstance(e, OSError):
            raise
        code = re.search(r"os error (\d+)", str(e))
        raise OSError(int(code.group(1)) if code else errno.EIO,
                      f"could not write checkpoint {name} ({str(e).splitlines()[0][:120]})", str(root)) from e
    files = {}
    for fname in (WEIGHTS, STATE, CONFIG):
        _fsync_file(tmp / fname)
        files[fname] = {"bytes": (tmp / fname).stat().st_size, "sha256": sha256_file(tmp / fname)}
    manifest = {"step": step, "created": now_iso(), "files": files,
                "tokens_seen": train_state.get("tokens_seen"), "val_loss": train_state.get("val_loss"),
                "tokenizer_sha256": train_state.get("tokenizer_sha256")}
    with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    final = root / name
    if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
        old = root / f".old_{name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    write_pointer(root, "latest", name)
    if best:
        write_pointer(root, "best", name)
    prune_checkpoints(root, keep_last)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete step folders (those with a manifest), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := STEP_RE.match(p.name)) and (p / MANIFEST).is_file()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` step folders plus the ones `best` and `latest` point at; remove stale
    temp folders left by a crash."""
    if keep_last <= 0:
        return
    keep = {read_pointer(root, "best"), read_pointer(root, "latest")}
    ckpts = list_checkpoints(root)
    for p in ckpts[:-keep_last]:
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp_step_*"):
        shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------------- reading


def verify_checkpoint(ckpt: str | Path, only: Iterable[str] | None = None, hashes: bool = True) -> dict[str, Any]:
    """The manifest, after checking the size and (unless `hashes` is False: check_hash does it later) sha256 of
    the listed files in `only` (None: all of them); CheckpointError names the culprit. Loading weights alone
    neither needs the optimizer state (state.pt, larger than the weights under AdamW) nor hashes it: a lost or
    damaged state.pt stops a resume, not generate, eval, export or init_from."""
    ckpt = Path(ckpt)
    mpath = ckpt / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete (no {MANIFEST}): use another checkpoint")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise CheckpointError(f"checkpoint manifest {mpath} is unreadable: use another checkpoint") from None
    if not isinstance(files, dict) or not all(
            isinstance(info, dict) and type(info.get("bytes")) is int and isinstance(info.get("sha256"), str)
            for info in files.values()):
        raise CheckpointError(f"checkpoint manifest {mpath} is unreadable (files must map each name to its bytes "
                              f"and sha256): use another checkpoint")
    for fname in files:
        if fname in ("", ".", "..") or Path(fname).name != fname:
            raise CheckpointError(f"checkpoint manifest {mpath} lists {quote(fname)}, not a file of this "
                                  f"checkpoint folder: use another checkpoint")
    for fname, info in files.items():
        if only is not None and fname not in only:
            continue
        f = ckpt / fname
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing: use another checkpoint")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint file {f} is truncated or damaged ({size} bytes, manifest says "
                                  f"{info['bytes']}): use another checkpoint")
        if hashes:
            check_hash(ckpt, fname, manifest)
    return manifest


def check_hash(ckpt: Path, fname: str, manifest: dict[str, Any]) -> None:
    """CheckpointError unless the file's sha256 is the one its manifest lists."""
    if sha256_file(ckpt / fname) != manifest["files"][fname]["sha256"]:
        raise CheckpointError(f"checkpoint file {ckpt / fname} is corrupt (sha256 differs from {MANIFEST}): "
                              f"use another checkpoint")


def find_resume(root: str | Path) -> Path | None:
    """The checkpoint to resume from: the one `latest` names, else the newest complete step folder."""
    root = Path(root)
    name = read_pointer(root, "latest")
    if name and (root / name / MANIFEST).is_file():
        return root / name
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | Path, which: str = "best") -> Path:
    """A checkpoint folder from a run folder, a `checkpoints` folder or a step folder.
    `which`: best (falls back to latest when no best was recorded), latest, or a step folder name."""
    path = Path(path)
    if STEP_RE.match(path.name) and path.is_dir():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not root.is_dir():
        raise CheckpointError(f"no checkpoints found at {path}: train first (antimatter train) or check the path")
    if which in ("best", "latest"):
        name = read_pointer(root, which) or (read_pointer(root, "latest") if which == "best" else None)
        if name and (root / name).is_dir():
            return root / name
        found = find_resume(root)
        if found is None:
            raise CheckpointError(f"no complete checkpoint in {root}: train first (antimatter train)")
        return found
    if (root / which).is_dir():
        return root / which
    if Path(which).is_dir():
        return resolve_checkpoint(Path(which), "latest")
    raise CheckpointError(f"checkpoint '{which}' not found in {root}: use best, latest or a step folder name")


def load_weights(ckpt: str | Path, tie_embeddings: bool, verify: bool = True) -> dict[str, torch.Tensor]:
    ckpt = Path(ckpt)
    if verify:
        verify_checkpoint(ckpt, only=(WEIGHTS,))  # the file read here
    try:
        sd = load_file(str(ckpt / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint file {ckpt / WEIGHTS} cannot be read ({e}): use another checkpoint") from None
    if tie_embeddings and "transformer.wte.weight" in sd:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def load_train_state(ckpt: str | Path, verify: bool = True) -> dict[str, Any]:
    """state.pt, unpickled with weights_only=True (a file that needs arbitrary code is refused)."""
    ckpt = Path(ckpt)
    if verify:
        verify_checkpoint(ckpt)
    try:
        return torch.load(ckpt / STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for unsafe content; RuntimeError/EOFError for damage
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint file {ckpt / STATE} was refused by torch.load(weights_only=True) "
                              f"({first[:200]}): it is damaged or unsafe; use another checkpoint") from None


def load_config_from_checkpoint(ckpt: str | Path) -> RunConfig:
    """The run config a checkpoint was saved with. The folder may come from elsewhere, so anything unreadable
    and any model section that cannot be built is one CheckpointError naming the file."""
    path = Path(ckpt) / CONFIG
    fix = "fix it or use another checkpoint"
    try:
        data = yaml_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"checkpoint config {path} cannot be read ({e.strerror or type(e).__name__}): "
                              "use another checkpoint") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"checkpoint config {path} is not UTF-8 text: {fix}") from None
    except (yaml.YAMLError, RecursionError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise CheckpointError(f"checkpoint config {path} is not valid YAML{where}: {fix}") from None
    except UserError as e:  # e.g. YAML aliases
        raise CheckpointError(f"checkpoint config {path} is refused ({e}): {fix}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint config {path} holds {type(data).__name__}, not a mapping of sections "
                              f"(model:, train:, ...): {fix}")
    data.setdefault("recipe", "gpt2")  # saved before recipes existed: every setting is written out, on GPT-2's
    try:  # defaults
        cfg = config_from_dict(data)
    except UserError as e:
        raise CheckpointError(f"checkpoint config {path} is invalid ({e}): {fix}") from None
    except (TypeError, ValueError, AttributeError, RecursionError):  # e.g. `model: 5` or non-string keys
        raise CheckpointError(f"checkpoint config {path} is malformed (each section must be a mapping of "
                              f"settings): {fix}") from None
    check_model_config(cfg.model, f"checkpoint config {path}", fix, error=CheckpointError)
    return cfg


def check_weight_shapes(ckpt: Path, cfg: ModelConfig) -> None:
    """The tensors config.yaml implies against those model.safetensors declares (its header only): a config
    that claims a larger model than the file holds is refused before GPT(cfg) would allocate it."""
    weights, config = ckpt / WEIGHTS, ckpt / CONFIG
    fix = f"{CONFIG} does not describe this checkpoint's weights; use another checkpoint"
    found = safetensors_shapes(weights, "use another checkpoint", error=CheckpointError)
    missing = first_missing_layer(found, cfg.n_layer)
    if missing is not None:  # before the meta model, which still costs Python objects per layer
        raise CheckpointError(f"{config} says model.n_layer={cfg.n_layer} but {WEIGHTS} has no layer {missing} "
                              f"(no 'transformer.h.{missing}.*' tensors): {fix}")
    expected = {k: tuple(v.shape) for k, v in meta_model(cfg, str(config), fix, CheckpointError).state_dict().items()}
    if cfg.tie_embeddings:  # stored once, as the embedding (a copy saved anyway must match it)
        head = expected.pop("lm_head.weight")
        if "lm_head.weight" in found:
            expected["lm_head.weight"] = head
    diff = first_difference(expected, found)
    if diff is None:
        return
    kind, name, count = diff
    if kind == "missing":
        raise CheckpointError(f"{weights} has no tensor '{name}', which {CONFIG} implies with shape "
                              f"{fmt_shape(expected[name])}: {fix}")
    if kind == "shape":
        raise CheckpointError(f"tensor '{name}' is {fmt_shape(found[name])} in {weights} but {CONFIG} implies "
                              f"{fmt_shape(expected[name])}: {fix}")
    raise CheckpointError(f"{weights} holds {count} tensors that {CONFIG} does not describe (e.g. {quote(name)}): "
                          f"{fix}")


def load_model(path: str | Path, which: str = "best", device: str | torch.device = "cpu"):
    """(model in eval mode, the run's config, the checkpoint folder) from a run, checkpoints or step folder.
    The config is checked against the weights' header before the model is built."""
    ckpt = resolve_checkpoint(path, which)
    manifest = verify_checkpoint(ckpt, only=(WEIGHTS, CONFIG), hashes=False)  # the files read here
    check_hash(ckpt, CONFIG, manifest)
    # the weights' sha256 (1.5 s for 1.6 GB) runs beside their loading: hashlib lets go of the GIL
    with ThreadPoolExecutor(1) as pool:
        hashed = pool.submit(check_hash, ckpt, WEIGHTS, manifest) if WEIGHTS in manifest["files"] else None
        try:
            model, cfg = _build_loaded(ckpt, device)
        finally:
            if hashed is not None:
                hashed.result()  # a corrupt file is named as corrupt, not by what it broke in the loading
    return model.eval(), cfg, ckpt


def _build_loaded(ckpt: Path, device: str | torch.device) -> tuple[GPT, RunConfig]:
    cfg = load_config_from_checkpoint(ckpt)
    check_weight_shapes(ckpt, cfg.model)
    sd = load_weights(ckpt, cfg.model.tie_embeddings, verify=False)
    model = GPT.for_weights(cfg.model, device)  # not initialised: every parameter is loaded next
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {ckpt / WEIGHTS} does not match its config.yaml (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}): use another checkpoint")
    return model, cfg


def checkpoint_tokenizer(ckpt: Path) -> str | None:
    """The sha256 of the tokenizer a checkpoint was trained with, or None where it records none (older
    checkpoints, imports of a folder without tokenizer.json). From the manifest where it is there, else from
    state.pt (training writes it there), memory-mapped so that the optimizer state in it is not read."""
    try:
        recorded = json.loads((ckpt / MANIFEST).read_text("utf-8")).get("tokenizer_sha256")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded or not (ckpt / STATE).is_file():
        return recorded or None
    try:
        state = torch.load(ckpt / STATE, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # load_model checked only its size; a file torch cannot map records nothing usable here
        return None
    return state.get("tokenizer_sha256") if isinstance(state, dict) else None


def check_checkpoint_tokenizer(ckpt: Path, tokenizer_file: str | Path | None, verb: str,
                               tokenizer_sha256: str | None = None) -> None:
    """Refuse to pair a checkpoint with a tokenizer other than the one it was trained with: its ids would
    be scored, decoded or exported as other text. Checkpoints that record none (older ones, imports without a
    tokenizer) pass. `tokenizer_sha256`: the file's digest where the caller already has it."""
    trained_with = checkpoint_tokenizer(ckpt)
    if not trained_with or not tokenizer_file or not Path(tokenizer_file).is_file():
        return
    actual = tokenizer_sha256 or sha256_file(tokenizer_file)
    if actual != trained_with:
        raise UserError(f"checkpoint {ckpt} was trained with another tokenizer (sha256 {trained_with[:12]}) "
                        f"than {tokenizer_file} (sha256 {actual[:12]}): {verb} it with the run (and tokenizer) "
                        f"it came from")
