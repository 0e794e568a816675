"""What training reports, and the clock it reports against.

    StepStats   one optimizer step as train_step returns it (device tensors: reading them would sync)
    TrainClock  training time: wall time after the first (compiling) step, minus evaluation and checkpoints
    Meter       sums the steps on the device, reads them once per log interval, turns them into rates
                (tokens/s, MFU), keeps the progress bar (and its ETA), and writes logs/metrics.jsonl and
                TensorBoard (rank 0)

metrics.jsonl has one JSON object a line: training rows {step, tokens, train_s, loss, lr, grad_norm,
tokens_per_s, mfu, mem_gb, elapsed, nonfinite_steps} and evaluation rows {step, tokens, train_s, val_loss,
val_bpb (when the tokens record their bytes per token)}.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

TB_NAMES = {"val_loss": "val/loss", "val_bpb": "val/bits_per_byte"}  # TensorBoard tags; the rest: train/KEY


@dataclass
class StepStats:
    """One optimizer step. The tensors stay on the device until the meter reads a log interval's sums."""

    loss: torch.Tensor  # mean over the micro-batches and the ranks (float32 scalar)
    grad_norm: torch.Tensor  # before clipping
    applied: torch.Tensor  # bool: loss and gradient norm finite, so the optimizers stepped
    nonfinite: torch.Tensor  # bool: a non-finite step that counts toward train.max_nonfinite
    lr: float  # AdamW's learning rate of this step
    tokens: int  # the global batch, in tokens


@dataclass
class IntervalStats:
    """The steps since the last log, read from the device."""

    loss: float | None  # mean over the applied steps (None if none was)
    grad_norm: float | None
    nonfinite_new: int  # non-finite steps in the interval
    nonfinite_run: int  # non-finite steps in a row up to now (may start before the interval)


def peak_memory_gib(device: torch.device) -> float:
    """GPU: the caching allocator's high-water mark; CPU: the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def trim_metrics(path: Path, step: int) -> None:
    """On resume, drop the rows of steps after the checkpoint at `step` (they will be logged again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut by a kill or a full disk: dropped, the step is logged again
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


class TrainClock:
    """Training time: wall time after the first (compiling) step of this process, minus evaluation and
    checkpoint pauses, plus what earlier processes of the run trained. Read it after a sync (log steps, pauses,
    the budget decision): the host runs ahead of the GPU in between."""

    def __init__(self, device: torch.device, prior: float):
        self.device, self.prior, self.paused = device, prior, 0.0
        self.started_at: float | None = None
        self._pause_start: float | None = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self.sync()
        self.started_at = time.perf_counter()

    def now(self) -> float:
        if self.started_at is None:
            return self.prior
        end = self._pause_start if self._pause_start is not None else time.perf_counter()
        return self.prior + end - self.started_at - self.paused

    def pause(self) -> None:
        self.sync()
        self._pause_start = time.perf_counter()

    def resume(self) -> float:
        """End a pause; returns its length."""
        self.sync()
        length = time.perf_counter() - self._pause_start
        self._pause_start = None
        if self.started_at is not None:
            self.paused += length
        return length


class Meter:
    """Per-step sums on the device, one read per log interval, and everything written from it: the progress
    bar, logs/metrics.jsonl and TensorBoard (rank 0 writes; every rank sums and reads alike)."""

    def __init__(self, *, log_dir: Path, is_main: bool, tensorboard: bool, step: int, max_steps: int | None,
                 global_tokens: int, flops_per_token: float, peak_flops: float | None, world_size: int,
                 device: torch.device, clock: TrainClock, val_bytes_per_token: float | None):
        self.log_dir, self.is_main, self.device, self.clock = log_dir, is_main, device, clock
        self.global_tokens, self.world_size = global_tokens, world_size
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.val_bytes_per_token = val_bytes_per_token
        zero = torch.zeros((), device=device, dtype=torch.float32)
        # read only at log steps: loss and grad-norm sums over the applied steps, their count, non-finite steps
        # in a row and in this interval
        self.loss_sum, self.norm_sum, self.applied = zero.clone(), zero.clone(), zero.clone()
        self.nonfinite_run, self.nonfinite_new = zero.clone(), zero.clone()
        self.tensorboard = None
        if is_main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow to import: only when asked for

            self.tensorboard = SummaryWriter(str(log_dir / "tensorboard"), purge_step=step + 1)
        self.interval_start, self.interval_start_step = time.perf_counter(), step
        self.steady_seconds, self.steady_steps = 0.0, 0  # the log intervals after the first (no compile/warm-up)
        self.intervals_logged = 0
        self.last_train_row: dict[str, Any] = {}
        self.bar = tqdm(total=max_steps, initial=step, disable=not is_main, file=sys.stderr, unit="step",
                        dynamic_ncols=True, desc="train")

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def record(self, stats: StepStats) -> None:
        """Add a step to the device sums (no sync) and advance the bar."""
        self.loss_sum += torch.where(stats.applied, stats.loss, 0.0)
        self.norm_sum += torch.where(stats.applied, stats.grad_norm.float(), 0.0)
        self.applied += stats.applied.float()
        self.nonfinite_run = (self.nonfinite_run + 1.0) * stats.nonfinite.float()
        self.nonfinite_new += stats.nonfinite.float()
        self.bar.update(1)

    def read(self) -> IntervalStats:
        """The interval's sums (the one host-device sync of a log interval); they start again from zero."""
        sums = torch.stack([self.loss_sum, self.norm_sum, self.applied, self.nonfinite_run, self.nonfinite_new])
        loss_sum, norm_sum, applied, run, new = sums.tolist()
        for total in (self.loss_sum, self.norm_sum, self.applied, self.nonfinite_new):
            total.zero_()
        return IntervalStats(loss=loss_sum / applied if applied else None,
                             grad_norm=norm_sum / applied if applied else None,
                             nonfinite_new=int(new), nonfinite_run=int(run))

    def log_train(self, step: int, tokens: int, lr: float, elapsed: float, interval: IntervalStats,
                  nonfinite_total: int) -> dict[str, Any]:
        """Rates over the interval, a metrics row, the bar's numbers; returns the row."""
        now = time.perf_counter()
        steps_done = step - self.interval_start_step
        tps = steps_done * self.global_tokens / max(now - self.interval_start, 1e-9)
        mfu = (tps * self.flops_per_token / (self.peak_flops * self.world_size)) if self.peak_flops else None
        row = {"step": step, "tokens": tokens, "train_s": round(self.clock.now(), 3), "loss": interval.loss,
               "lr": lr, "grad_norm": interval.grad_norm, "tokens_per_s": round(tps, 1),
               "mfu": round(mfu, 4) if mfu is not None else None, "mem_gb": round(peak_memory_gib(self.device), 3),
               "elapsed": round(elapsed, 2), "nonfinite_steps": nonfinite_total}
        self.write(row)
        if self.is_main:
            post = {"loss": f"{row['loss']:.4f}" if row["loss"] is not None else "nan", "tok_s": f"{tps:,.0f}"}
            if mfu is not None:  # a GPU in the peak table
                post["mfu"] = f"{mfu:.1%}"
            self.bar.set_postfix(post, refresh=False)
        if self.intervals_logged:
            self.steady_seconds += now - self.interval_start
            self.steady_steps += steps_done
        self.intervals_logged += 1
        self.interval_start, self.interval_start_step = now, step
        self.last_train_row = row
        return row

    def log_eval(self, step: int, tokens: int, val_loss: float | None) -> None:
        """A val-loss row (taken in a pause of the clock: train_s is the training time at the evaluation)."""
        row = {"step": step, "tokens": tokens, "train_s": round(self.clock.now(), 3), "val_loss": val_loss}
        if val_loss is not None and self.val_bytes_per_token:
            row["val_bpb"] = val_loss / math.log(2) / self.val_bytes_per_token
        self.write(row)

    def exclude_pause(self, seconds: float) -> None:
        """Evaluation and checkpoints are not training time: tokens/s leaves them out."""
        self.interval_start += seconds

    def set_total(self, max_steps: int) -> None:
        """The step count is known (a time budget fixed it): the bar shows progress and ETA."""
        self.bar.total = max_steps
        self.bar.refresh()

    def tokens_per_s(self, trained_tokens: int, seconds: float) -> float | None:
        """The run's rate: over the log intervals after the first (steady state), else over the whole run."""
        if self.steady_steps > 0:
            return self.steady_steps * self.global_tokens / max(self.steady_seconds, 1e-9)
        return trained_tokens / seconds if seconds > 0 and trained_tokens else None

    def write(self, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.log_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self.tensorboard.add_scalar(TB_NAMES.get(key, f"train/{key}"), value, row["step"])

    def close(self) -> None:
        """The bar first (before an error or the last log lines are printed), then TensorBoard."""
        self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
