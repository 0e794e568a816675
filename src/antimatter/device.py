"""Where a command runs: the device a setting asks for, decided the same way by training, evaluation
and generation (not a training concern, so not under train/)."""

from __future__ import annotations

import torch

from antimatter.errors import UserError


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
