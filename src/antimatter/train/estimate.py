"""How long a run will take, said before it is too late to change it.

    estimate_message   the line a step-count run logs once its first steps are timed, and the warning that
                       follows it when the rest will take more than an hour on a CPU
    check_default_model  a run that chose no model, about to train on a CPU: refused with the estimate and
                       the commands that fit (see its docstring for why it refuses instead of shrinking)
"""

from __future__ import annotations

import time

from antimatter.config import RunConfig, default_model
from antimatter.errors import UserError

CPU_WARN_SECONDS = 3600.0  # a CPU run estimated past this is warned about (or, with no model chosen, refused)
# the commands that fit on a CPU, named by the warning and the refusal
FITS_ON_CPU = ("`antimatter quickstart` (a 4-layer model, about 3 minutes), or choose a model and a time: "
               "model=quickstart train.max_minutes=10")
# a CPU's training steps reach about this fraction of the probe's rate: GPT-2 124M, one step of 1 x 1024 tokens
# (forward, backward, AdamW) against 1024^2 fp32 matmuls on a 2-core CPU gave 0.59 on the first step, 0.81 on
# the second; the estimate is rough (within 2x), enough to tell minutes from days
CPU_TRAIN_EFFICIENCY = 0.7


def format_duration(seconds: float) -> str:
    """4.3 s, 12 min 5 s, 1 h 12 min, 43 h."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 3600:
        m, s = divmod(round(seconds), 60)
        return f"{m} min {s} s" if s else f"{m} min"
    h, m = divmod(round(seconds / 60), 60)
    return f"{h} h {m} min" if m and h < 10 else f"{h} h"


def format_step(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def estimate_message(step: int, max_steps: int, per_step: float, timed_steps: int, on_cpu: bool) -> list[str]:
    """The estimate of a step-count run (training time only: evaluations and checkpoints come on top), and
    on a CPU past an hour a warning that names what would fit."""
    left = max(0, max_steps - step)
    seconds = left * per_step
    lines = [f"estimated {format_duration(seconds)} for the {left:,} steps left (to step {max_steps:,}) at "
             f"{format_step(per_step)} a step, timed over {timed_steps} steps after the compile/first step"]
    if on_cpu and seconds > CPU_WARN_SECONDS:
        lines.append(f"warning: this run needs about {format_duration(seconds)} on the CPU; for one that fits, "
                     f"stop it (Ctrl-C) and run {FITS_ON_CPU} (or fewer train.max_steps, or a GPU)")
    return lines


def cpu_matmul_flops(n: int = 1024, reps: int = 3) -> float:
    """FLOP/s of one fp32 n x n matmul on this CPU (a fraction of a second)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool, caches
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2.0 * n**3 * reps / max(time.perf_counter() - start, 1e-9)


def cpu_seconds_estimate(cfg: RunConfig) -> float:
    """The training time of `cfg` on this CPU, from its FLOPs and a matmul probe (rough: within 2x)."""
    from antimatter.model.sizing import flops_per_token

    tc = cfg.train
    step_tokens = tc.global_batch_tokens or tc.micro_batch_size * cfg.seq_len
    flops = flops_per_token(cfg.model, cfg.seq_len) * step_tokens * tc.max_steps
    return flops / (cpu_matmul_flops() * CPU_TRAIN_EFFICIENCY)


def model_chosen(cfg: RunConfig) -> bool:
    """False when the model section is its recipe's default untouched: no preset and no field set (no config
    file gave one and no model.* override did). `model=gpt2-124m` chooses the same shape explicitly."""
    return cfg.model != default_model(cfg.recipe)


def check_default_model(cfg: RunConfig, log=print) -> None:
    """A run with no model chosen, training on a CPU for a step count: refuse when it would take more than an
    hour, with one line giving the estimate and what fits; else log which model it trains.

    Why refuse rather than quietly train a smaller model: nanoGPT's train.py and litgpt both train exactly
    the model they are given (nanoGPT's default is this same 124M shape; its CPU recipe passes a small
    config), so a user of either expects the model named in the config, on every machine. Swapping in a
    smaller one on a CPU would make the same command produce different architectures, vocabularies and
    checkpoints on a laptop and on a GPU box. The refusal comes before the data stages, so nothing is spent
    on a 50k-token tokenizer for a model that will not be trained. GPUs are not checked: there the default
    takes minutes. A time budget (train.max_minutes) is a choice of how long, so it is not refused either.
    """
    if model_chosen(cfg) or cfg.train.max_minutes > 0:
        return
    from antimatter.device import pick_device

    if pick_device(cfg.train.device).type != "cpu":
        return
    seconds = cpu_seconds_estimate(cfg)
    what = (f"no model was chosen, so the default is the gpt2-124m size ({cfg.model.n_layer} layers, d "
            f"{cfg.model.d_model}, vocab {cfg.model.vocab_size:,}; {cfg.recipe} recipe) for {cfg.train.max_steps:,} steps")
    if seconds > CPU_WARN_SECONDS:
        raise UserError(f"{what}: about {format_duration(seconds)} on this CPU. Run {FITS_ON_CPU} (to train "
                        f"the default anyway, name it: model=gpt2-124m)")
    log(f"note: {what}, about {format_duration(seconds)} on this CPU (model=NAME picks another)")
