"""Where and in what precision a command runs: the device a setting asks for and the one dtype policy.

Training, evaluation and generation decide both here, so `auto` means the same on every command:

    auto  -> bf16 on a CUDA GPU that has it, fp16 on one that does not (training adds a gradient scaler),
             fp32 elsewhere (CPU, MPS)
    bf16 / fp16 / fp32 -> used as asked, on any device; bf16 on a GPU without it is refused (naming the
             setting) rather than quietly replaced, so a result never carries another precision than asked

Export's dtype is a storage format, not a compute precision: it is named explicitly and only looked up in
DTYPES.
"""

from __future__ import annotations

import contextlib

import torch

from antimatter.errors import UserError

# the torch dtype of each name in config.DTYPE_NAMES (config checks names without importing torch)
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(pref: str | None, local_rank: int = 0, setting: str = "train.device") -> torch.device:
    """The device a setting asks for (`auto`: this rank's GPU, else the CPU), or a UserError naming
    `setting` when that device is not there."""
    if pref in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    dev = torch.device(pref)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{setting}={pref} but CUDA is not available: use {setting}=cpu or auto")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{setting}={pref} but MPS is not available: use {setting}=cpu or auto")
    return dev


def resolve_dtype(requested: str, device: torch.device, setting: str = "train.dtype") -> str:
    """The precision `requested` (auto, bf16, fp16, fp32) means on `device`, by the policy above; a
    UserError naming `setting` when the device cannot do it."""
    if requested == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested not in DTYPES:
        raise UserError(f"{setting} must be auto, bf16, fp16 or fp32, got '{requested}'")
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"{setting}=bf16 but {torch.cuda.get_device_name(device)} has no bf16: "
                        f"use {setting}=fp16 (or auto)")
    return requested


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Mixed precision for a resolved dtype: autocast to bf16/fp16 (weights stay as they are), nothing for
    fp32."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])
