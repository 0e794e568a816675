"""The training loop: one file, read top to bottom.

    train(cfg, run_dir)  ->  summary dict

One code path for 1 CPU, 1 GPU, N GPUs and several nodes (torchrun; DDP or FSDP2). Each optimizer step:

    lr from the schedule (a pure function of the step)
    fetch micro_batch x accum windows (this rank's share of the global batch), copy them to the device
    for each micro-batch: forward (autocast) + backward, gradient all-reduce only on the last one
    unscale (fp16), clip, and a fused AdamW step that is skipped ON THE DEVICE when the loss or the
    gradient norm is not finite (no host-device sync)
    every log_interval: read the accumulated loss/grad-norm (the only sync), log, progress bar
    every eval_interval: val loss; every ckpt_interval (and at the end, and on SIGTERM/SIGINT): checkpoint

The global batch in tokens is fixed by the config; micro-batch x accumulation x world size is derived
from it, so a run gives the same optimisation on any number of processes.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from antimatter import checkpoint as ckpt_io
from antimatter.config import RunConfig, save_config
from antimatter.device import DTYPES, autocast, resolve_dtype
from antimatter.errors import UserError
from antimatter.files import exclusive_lock
from antimatter.model.accel import attention_backend, enable_fp8_training
from antimatter.model.gpt import GPT
from antimatter.train.distributed import (
    Dist,
    StopFlag,
    all_reduce_sum,
    broadcast_object,
    gather_objects,
    grad_sync,
    init_distributed,
    shutdown,
    wrap_model,
)
from antimatter.train.optim import build_optimizers, lr_factor, set_lr

TB_NAMES = {"val_loss": "val/loss", "val_bpb": "val/bits_per_byte"}  # TensorBoard tags; the rest: train/KEY
UNDECIDED = 2**62  # the step count of a time-budgeted run before its first steps are timed
# A budgeted run times CALIBRATION_STEPS steps one by one, after the compiling step and CALIBRATION_SKIP more
# (the first steps run slower: allocator and cache warm-up); their median fixes the step count
CALIBRATION_SKIP, CALIBRATION_STEPS = 5, 10


def train(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """Train `cfg.model` on `run_dir/tokens`, writing checkpoints and logs into `run_dir`."""
    d = init_distributed(cfg.train.device)
    try:
        return Trainer(cfg, Path(run_dir), d).fit()
    finally:
        shutdown(d)


# ------------------------------------------------------------------------------------------- helpers


def batch_geometry(global_batch_tokens: int, micro: int, seq_len: int, world: int) -> tuple[int, int]:
    """(global batch in tokens, accumulation steps): global = micro x seq_len x world x accum."""
    per_pass = micro * seq_len * world
    if global_batch_tokens <= 0:
        return per_pass, 1
    if global_batch_tokens % per_pass:
        lo = max(per_pass, global_batch_tokens // per_pass * per_pass)
        raise UserError(
            f"train.global_batch_tokens ({global_batch_tokens:,}) is not a multiple of micro_batch_size x "
            f"seq_len x processes = {micro} x {seq_len} x {world} = {per_pass:,}: use e.g. "
            f"train.global_batch_tokens={lo} or change train.micro_batch_size")
    return global_batch_tokens, global_batch_tokens // per_pass


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list | tuple) else x


def peak_memory_gib(device: torch.device) -> float:
    """GPU: the caching allocator's high-water mark; CPU: the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _step_unless_nonfinite(opt: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """opt.step(), undone on the device when `finite` is False: no host sync. For optimizers without a
    `found_inf` input (Muon): the parameters and their state tensors are copied before and selected after."""
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    before = [(p, p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)})
              for p in params]
    for p in params:  # a NaN gradient must not reach the state it would poison
        p.grad.copy_(torch.where(finite, p.grad, 0.0))
    opt.step()
    with torch.no_grad():
        for p, old, old_state in before:
            p.copy_(torch.where(finite, p, old))
            for k, v in opt.state[p].items():
                if torch.is_tensor(v) and v.dtype.is_floating_point:
                    v.copy_(torch.where(finite, v, old_state[k] if k in old_state else torch.zeros_like(v)))


class _TrainClock:
    """Training time: wall time after the first (compiling) step of this process, minus evaluation and
    checkpoint pauses, plus what earlier processes of the run trained. Read it after a sync (log steps, pauses,
    the budget decision): the host runs ahead of the GPU in between."""

    def __init__(self, device: torch.device, prior: float):
        self.device, self.prior, self.paused = device, prior, 0.0
        self.t0: float | None = None
        self._pause_t: float | None = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self.sync()
        self.t0 = time.perf_counter()

    def now(self) -> float:
        if self.t0 is None:
            return self.prior
        end = self._pause_t if self._pause_t is not None else time.perf_counter()
        return self.prior + end - self.t0 - self.paused

    def pause(self) -> None:
        self.sync()
        self._pause_t = time.perf_counter()

    def resume(self) -> float:
        """End a pause; returns its length."""
        self.sync()
        dt = time.perf_counter() - self._pause_t
        self._pause_t = None
        if self.t0 is not None:
            self.paused += dt
        return dt


class _Signals:
    """SIGTERM/SIGINT set a flag: the loop finishes its step, checkpoints and returns. A second SIGINT
    interrupts at once."""

    def __init__(self):
        self.received: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ------------------------------------------------------------------------------------------- trainer


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, d: Dist):
        self.cfg, self.t, self.run_dir, self.d = cfg, cfg.train, run_dir, d
        self.device = d.device
        self.ckpt_root = ckpt_io.checkpoints_dir(run_dir)
        self.log_dir = run_dir / "logs"
        self.seq_len = cfg.seq_len
        t = self.t
        self.global_tokens, self.accum = batch_geometry(t.global_batch_tokens, t.micro_batch_size,
                                                        self.seq_len, d.world_size)
        self.dtype = resolve_dtype(t.dtype, self.device)
        if self.dtype == "fp16" and t.parallel == "fsdp" and d.enabled:
            raise UserError("train.parallel=fsdp supports bf16 and fp32, not fp16: use train.dtype=bf16 "
                            "or fp32, or train.parallel=ddp on GPUs without bf16")
        self.tokens_dir = run_dir / "tokens"
        self._check_vocab()
        self._check_tokenizer()
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls that remain
            torch.backends.cudnn.allow_tf32 = True

    # ---------------------------------------------------------------------------------- set-up
    def _check_vocab(self) -> None:
        from antimatter.tokens import read_header

        meta_path = self.tokens_dir / "meta.json"
        self.val_bytes_per_token = None  # for val loss in bits per byte (a figure free of the tokenizer)
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            vocab = int(meta["vocab_size"])
            val = meta.get("splits", {}).get("val", {})
            self.val_bytes_per_token = float(val.get("bytes_per_token") or 0) or None
        else:
            shards = sorted((self.tokens_dir / "train").glob("*.bin"))
            if not shards:
                raise UserError(f"no token shards in {self.tokens_dir / 'train'}: run `antimatter tokenize` first")
            vocab = read_header(shards[0])["vocab_size"]
        if vocab > self.cfg.model.vocab_size:
            raise UserError(f"the tokens in {self.tokens_dir} use a vocabulary of {vocab:,} ids but "
                            f"model.vocab_size is {self.cfg.model.vocab_size:,}: set model.vocab_size={vocab} "
                            f"(or more)")
        self.data_vocab = vocab

    def _check_tokenizer(self) -> None:
        """The run's tokenizer must be the one that made the tokens: the checkpoints are evaluated, exported
        and sampled with it. Its sha256 goes into every checkpoint (None where neither records one)."""
        from antimatter.provenance import sha256_file
        from antimatter.tokens import check_tokenizer, recorded_tokenizer

        tok_file = self.run_dir / "tokenizer" / "tokenizer.json"
        actual = sha256_file(tok_file) if tok_file.is_file() else None
        if actual:
            check_tokenizer(self.tokens_dir, tok_file, actual)
        # rank 0's: every rank then takes the same decision on resume
        self.tokenizer_sha256 = broadcast_object(actual or recorded_tokenizer(self.tokens_dir), self.d)

    def log(self, msg: str) -> None:
        """Rank 0: to stderr (above the progress bar) and to logs/train.log."""
        if not self.d.is_main:
            return
        tqdm.write(msg, file=sys.stderr)
        with open(self.log_dir / "train.log", "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")

    def _find_resume(self) -> Path | None:
        r = self.t.resume
        if r in ("none", "", "no", "false"):
            return None
        if r == "auto":
            return ckpt_io.find_resume(self.ckpt_root)
        return ckpt_io.resolve_checkpoint(Path(r), "latest")

    def _build(self) -> None:
        cfg, t, d = self.cfg, self.t, self.d
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        model = GPT(cfg.model)
        model.activation_checkpointing = t.activation_checkpointing
        model.loss_chunk_tokens = t.loss_chunk_tokens
        # rank 0 reads the checkpoint and shares it: other nodes need not see the same disk
        resume = self._find_resume() if d.is_main else None
        resume = broadcast_object(str(resume) if resume else None, d)
        self.resume_from = Path(resume) if resume else None
        state, weights = None, None  # both only on rank 0
        if self.resume_from is not None and d.is_main:
            state = ckpt_io.load_train_state(self.resume_from)  # verifies the manifest first
            weights = ckpt_io.load_weights(self.resume_from, cfg.model.tie_embeddings, verify=False)
        elif t.init_from and d.is_main:
            if (Path(t.init_from) / "config.json").is_file():
                raise UserError(f"train.init_from={t.init_from} is a Hugging Face folder: convert it first with "
                                f"`antimatter import --hf {t.init_from} --out RUN` and use RUN's checkpoint")
            src = ckpt_io.resolve_checkpoint(Path(t.init_from), "latest")
            weights = ckpt_io.load_weights(src, cfg.model.tie_embeddings)
            self.log(f"initialised weights from {src}")
        if weights is not None:
            own = model.state_dict()
            wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in weights.items()
                     if k in own and v.shape != own[k].shape]
            if wrong:  # load_state_dict would raise a RuntimeError listing every tensor
                raise UserError(f"checkpoint weights do not fit the model config ({len(wrong)} tensors of another "
                                f"shape, e.g. {wrong[0]}): use the same model settings as that run")
            missing, unexpected = model.load_state_dict(weights, strict=False)
            if missing or unexpected:
                raise UserError(f"checkpoint weights do not fit model config (missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]}): use the same model settings as that run")
        model.to(self.device)
        if t.fp8:  # before wrapping: FSDP and DDP then see the float8 Linears
            self.log(f"fp8: {enable_fp8_training(model)} Linear layers use torchao float8 matmuls")
        self.model = model  # the uncompiled module: its state dicts have clean names
        mp = DTYPES[self.dtype] if self.dtype == "bf16" and self.device.type == "cuda" else None
        self.wrapped = wrap_model(model, d, t.parallel, mp)  # DDP broadcasts rank 0's weights
        if d.enabled and t.parallel == "fsdp" and broadcast_object(weights is not None, d):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, weights if d.is_main else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        if t.compile:
            import torch._inductor.config as inductor_config

            # set either way: a process that trains twice (tests, notebooks) does not keep the last run's tuning
            inductor_config.coordinate_descent_tuning = t.compile_tuning
        self.step_model = torch.compile(self.wrapped, backend=t.compile_backend) if t.compile else self.wrapped
        # after sharding: FSDP2 params are DTensors. [AdamW] or [Muon, AdamW]; AdamW is last and fused
        self.optimizers = build_optimizers(self.model, t, self.device.type)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == "fp16" else None
        from antimatter.tokens import TokenWindows

        self.loader = TokenWindows(self.tokens_dir / "train", self.seq_len, seed=t.seed, rank=d.rank,
                                   world_size=d.world_size, vocab_size=cfg.model.vocab_size)
        # defaults for a fresh run
        self.step, self.tokens_seen, self.best_val, self.last_val = 0, 0, math.inf, None
        self.nonfinite_total = 0
        # the step count: the config's, or (time budget) chosen after the first steps and kept across resumes
        self.budget: dict[str, Any] | None = None
        self.max_steps = t.max_steps if t.max_minutes <= 0 else UNDECIDED
        self.compile_seconds = 0.0
        self.train_seconds = 0.0  # training time so far (compile, evaluation and checkpoints not counted)
        if self.resume_from is not None:
            optim_sd = state.pop("optimizer") if d.is_main else {}
            self._restore(broadcast_object(state, d), optim_sd)

    def _restore(self, state: dict[str, Any], optim_sd: dict[str, Any]) -> None:
        """Everything but the weights: optimizer (rank 0's full copy, sharded/broadcast by the call), scaler,
        data position, counters and this rank's RNG streams."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        d = self.d
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=d.enabled)
        saved_tok = state.get("tokenizer_sha256")
        if saved_tok and self.tokenizer_sha256 and saved_tok != self.tokenizer_sha256:
            raise UserError(f"the training tokens changed since this state was saved: {self.resume_from} was "
                            f"trained on tokens of another tokenizer (sha256 {saved_tok[:12]}) than those in "
                            f"{self.tokens_dir} (made by {self.tokenizer_sha256[:12]}): resume with the "
                            f"tokens and tokenizer it was trained on, or start a new run (train.resume=none)")
        saved_opt = state.get("optimizer_name", "adamw")
        if saved_opt != self.t.optimizer:
            raise UserError(f"{self.resume_from} was trained with train.optimizer={saved_opt}, not "
                            f"{self.t.optimizer}: resume with train.optimizer={saved_opt}, or start a new run from "
                            f"its weights with train.init_from={self.resume_from} train.resume=none")
        # the checkpoint's state (moments, momentum buffers, step counts) with this config's hyperparameters:
        # a resume at a lower train.lr (the advice after a divergence) must step at the new rate
        fresh = [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in self.optimizers]
        set_optimizer_state_dict(self.model, self.optimizers, optim_sd, options=opts)
        for opt, groups in zip(self.optimizers, fresh):
            for g, hyper in zip(opt.param_groups, groups):
                g.update(hyper)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["data"])
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.best_val = float(state.get("best_val_loss", math.inf))
        self.last_val = state.get("val_loss")
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        if self.t.max_minutes > 0 and state.get("budget"):
            self.budget = dict(state["budget"])
            self.max_steps = int(self.budget["max_steps"])
            if abs(self.budget["minutes"] - self.t.max_minutes) > 1e-9:
                self.log(f"note: train.max_minutes is {self.t.max_minutes:g} but this run fixed its schedule for "
                         f"{self.budget['minutes']:g} minutes ({self.max_steps:,} steps): keeping that schedule")
        rngs = state["rng"]
        set_rng_state(rngs[d.rank] if d.rank < len(rngs) else rngs[0], self.device)
        saved_world, saved_global = int(state.get("world_size", 1)), int(state.get("global_batch_tokens", 0))
        self.log(f"resumed from {self.resume_from} at step {self.step:,} ({self.tokens_seen:,} tokens seen)")
        if saved_global and saved_global != self.global_tokens:
            self.log(f"warning: global batch changed from {saved_global:,} to {self.global_tokens:,} tokens per "
                     f"step: the optimisation and the data order per step differ from the original run")
        elif saved_world != d.world_size:
            self.log(f"note: resuming a {saved_world}-process run on {d.world_size} processes: the global batch "
                     f"({self.global_tokens:,} tokens) and the windows of every step are kept; only the "
                     f"micro-batch accumulation ({state.get('accum')} -> {self.accum}) and so the summation "
                     f"order of gradients change, and per-rank RNG streams (dropout) are not carried over")

    # ------------------------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        """Train, holding the run folder's lock: a second `antimatter train` on the same run is refused (it
        would interleave checkpoints and metrics), whichever rank learns it."""
        with contextlib.ExitStack() as stack:
            refused = None
            if self.d.is_main:
                try:
                    stack.enter_context(exclusive_lock(self.run_dir / "train.lock", f"run {self.run_dir}"))
                except UserError as e:
                    refused = str(e)
            if refused := broadcast_object(refused, self.d):
                raise UserError(refused)
            return self._fit()

    def _fit(self) -> dict[str, Any]:
        cfg, t, d = self.cfg, self.t, self.d
        if d.is_main:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self._build()
        if d.is_main:
            self._trim_metrics()
        self.eval_batches = self._eval_batches()
        self.flops_per_token, self.peak = self._flops()
        n_params = self.model.num_params()
        self.log(f"train: {n_params:,} parameters, {self.dtype} on {self.device} x{d.world_size} "
                 f"({t.parallel if d.enabled else 'single process'}); global batch {self.global_tokens:,} "
                 f"tokens = micro-batch {t.micro_batch_size} x seq_len {self.seq_len} x {self.accum} "
                 f"accumulation x {d.world_size} processes; steps {self.step}->"
                 f"{self.max_steps if self.max_steps != UNDECIDED else f'(fit to {t.max_minutes:g} minutes)'}")
        self.tb, self.bar = None, None
        if d.is_main and t.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.log_dir / "tensorboard"), purge_step=self.step + 1)
        try:  # the attention preference is read when the step is traced, so it wraps the whole loop
            with _Signals() as sigs, attention_backend(t.attention):
                return self._loop(sigs)
        finally:
            if self.bar is not None:  # closed before an error is printed, not after it at exit
                self.bar.close()
            if self.tb is not None:
                self.tb.close()

    def _loop(self, sigs: _Signals) -> dict[str, Any]:
        t, d, dev = self.t, self.d, self.device
        stop = StopFlag(d)
        start_step, t_start = self.step, time.perf_counter()
        mixed = autocast(dev, self.dtype)
        max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
        params = [p for p in self.model.parameters() if p.requires_grad]
        log_every = max(1, t.log_interval)
        # device-side accumulators, read only at log steps: loss, grad norm, good steps, non-finite (run, new)
        acc = torch.zeros(5, device=dev, dtype=torch.float32)
        last_log_t, last_log_step = time.perf_counter(), self.step
        steady = [0.0, 0]  # training seconds and steps after the first log interval (no compile/warm-up)
        first_log_done = False
        stopped = "max_steps"
        last_ckpt: Path | None = self.resume_from
        metrics: dict[str, Any] = {}
        clock = _TrainClock(dev, self.train_seconds)
        step_ends: list[float] = []  # a budgeted run's timed steps, until its step count is fixed
        bar = self.bar = tqdm(total=self.max_steps if self.max_steps != UNDECIDED else None, initial=self.step,
                              disable=not d.is_main, file=sys.stderr, unit="step", dynamic_ncols=True, desc="train")
        self.wrapped.train()
        while self.step < self.max_steps and not (0 < t.stop_step <= self.step):
            lr_f = lr_factor(self.step, t, self.max_steps)
            set_lr(self.optimizers, lr_f)
            lr = t.lr * lr_f
            batches = [self.loader.next_batch(t.micro_batch_size) for _ in range(self.accum)]
            data_state = self.loader.state_dict()
            if dev.type == "cuda":  # pinned host memory -> asynchronous copies that overlap compute
                batches = [(x.pin_memory().to(dev, non_blocking=True), y.pin_memory().to(dev, non_blocking=True))
                           for x, y in batches]
            step_loss = torch.zeros((), device=dev, dtype=torch.float32)
            for i, (x, y) in enumerate(batches):
                with grad_sync(self.wrapped, i == self.accum - 1):
                    with mixed:
                        loss = self.step_model(x, y)
                    step_loss += loss.detach().float()
                    scaled = loss / self.accum
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            if self.scaler is not None:
                for opt in self.optimizers:
                    self.scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
                norm = norm.full_tensor()
            step_loss /= self.accum
            if d.enabled:  # the mean over ranks, on the device (no sync): every rank decides alike
                all_reduce_sum(step_loss, d).div_(d.world_size)
            finite = torch.isfinite(norm) & torch.isfinite(step_loss)
            self._optimizer_step(finite)
            # an overflow of the scaled fp16 grads is routine (the scaler skips the step), not bad
            bad = ~torch.isfinite(step_loss) if self.scaler is not None else ~finite
            acc[0] += torch.where(finite, step_loss, 0.0)
            acc[1] += torch.where(finite, norm.float(), 0.0)
            acc[2] += finite.float()
            acc[3] = (acc[3] + 1.0) * bad.float()
            acc[4] += bad.float()
            self.step += 1
            self.tokens_seen += self.global_tokens
            bar.update(1)
            if self.step == start_step + 1:  # the first step compiles: training time starts after it
                clock.start()
                self.compile_seconds = time.perf_counter() - t_start
                step_ends = [clock.t0]
            elif self.max_steps == UNDECIDED:  # each timed step alone (a sync each), until the count is fixed
                clock.sync()
                step_ends.append(time.perf_counter())
                if len(step_ends) > CALIBRATION_SKIP + CALIBRATION_STEPS:
                    timed = step_ends[CALIBRATION_SKIP:]
                    self._fix_budget(clock, [b - a for a, b in zip(timed, timed[1:])])
                    bar.total = self.max_steps
                    bar.refresh()

            last = self.step >= self.max_steps
            elapsed = time.perf_counter() - t_start
            at_stop_step = 0 < t.stop_step <= self.step and not last
            want_stop = at_stop_step or stop.any(
                sigs.received is not None or (t.max_time_s > 0 and elapsed >= t.max_time_s and d.is_main))
            if want_stop:
                stopped = "signal" if sigs.received else "stop_step" if at_stop_step else "time"
            if self.step % log_every == 0 or last or want_stop:
                loss_v, norm_v, good_v, run_v, new_v = acc.tolist()  # the one host-device sync
                now = time.perf_counter()
                steps_done = self.step - last_log_step
                tps = steps_done * self.global_tokens / max(now - last_log_t, 1e-9)
                mfu = (tps * self.flops_per_token / (self.peak * d.world_size)) if self.peak else None
                self.nonfinite_total += int(new_v)
                metrics = {"step": self.step, "tokens": self.tokens_seen, "train_s": round(clock.now(), 3),
                           "loss": loss_v / good_v if good_v else None,
                           "lr": lr, "grad_norm": norm_v / good_v if good_v else None,
                           "tokens_per_s": round(tps, 1), "mfu": round(mfu, 4) if mfu is not None else None,
                           "mem_gb": round(peak_memory_gib(dev), 3), "elapsed": round(elapsed, 2),
                           "nonfinite_steps": self.nonfinite_total}
                self._write_metrics(metrics)
                if d.is_main:
                    post = {"loss": f"{metrics['loss']:.4f}" if metrics["loss"] is not None else "nan",
                            "tok_s": f"{tps:,.0f}"}
                    if mfu is not None:  # a GPU in the peak table
                        post["mfu"] = f"{mfu:.1%}"
                    bar.set_postfix(post, refresh=False)
                acc[[0, 1, 2, 4]] = 0.0
                if first_log_done:
                    steady[0] += now - last_log_t
                    steady[1] += steps_done
                first_log_done = True
                last_log_t, last_log_step = now, self.step
                if run_v >= t.max_nonfinite:
                    bar.close()
                    where = last_ckpt if last_ckpt else "none yet"
                    raise UserError(
                        f"training diverged: {int(run_v)} optimizer steps in a row up to step {self.step} had "
                        f"a non-finite loss or gradient (all skipped); last good checkpoint: {where}. Lower "
                        f"train.lr, raise train.warmup_steps or use train.dtype=bf16/fp32, then resume")
            is_ckpt = (t.ckpt_interval > 0 and self.step % t.ckpt_interval == 0) or last or want_stop
            eval_every = self._eval_every()
            is_eval = (eval_every > 0 and self.step % eval_every == 0) or is_ckpt
            if is_eval or is_ckpt:
                clock.pause()  # evaluation and checkpoints are not training time
                self.train_seconds = clock.now()
                if is_eval:
                    self.last_val = self.evaluate()
                    row = {"step": self.step, "tokens": self.tokens_seen, "train_s": round(self.train_seconds, 3),
                           "val_loss": self.last_val}
                    if self.last_val is not None and self.val_bytes_per_token:
                        row["val_bpb"] = self.last_val / math.log(2) / self.val_bytes_per_token
                    self._write_metrics(row)
                if is_ckpt:
                    last_ckpt = self.save(data_state)
                last_log_t += clock.resume()  # tokens/s counts training time only
            if want_stop:
                break
        bar.close()
        self.train_seconds = clock.now()
        seconds = time.perf_counter() - t_start
        trained = (self.step - start_step) * self.global_tokens
        if steady[1] > 0:  # steady state: the log intervals after the first
            tps = steady[1] * self.global_tokens / max(steady[0], 1e-9)
        else:
            tps = trained / seconds if seconds > 0 and trained else None
        summary = {
            "steps": self.step, "start_step": start_step, "tokens_seen": self.tokens_seen,
            "params": self.model.num_params(),
            "last_loss": metrics.get("loss"), "last_val_loss": self.last_val,
            "best_val_loss": self.best_val if math.isfinite(self.best_val) else None,
            "tokens_per_s": round(tps, 1) if tps else None,
            "mfu": metrics.get("mfu"), "seconds": round(seconds, 2), "stopped": stopped,
            "nonfinite_steps": self.nonfinite_total, "checkpoint": str(last_ckpt) if last_ckpt else None,
            "best_checkpoint": (str(self.ckpt_root / b) if (b := ckpt_io.read_pointer(self.ckpt_root, "best"))
                                else None),
            "train_seconds": round(self.train_seconds, 2), "compile_seconds": round(self.compile_seconds, 2),
            "eval_checkpoint_seconds": round(clock.paused, 2), "budget": self.budget,
            "world_size": d.world_size, "micro_batch_size": t.micro_batch_size, "accum_steps": self.accum,
            "global_batch_tokens": self.global_tokens, "dtype": self.dtype, "device": str(self.device),
        }
        if stopped != "max_steps":
            why = {"signal": sigs.received, "stop_step": "train.stop_step", "time": "train.max_time_s"}[stopped]
            self.log(f"stopped by {why} at step {self.step}: checkpoint {last_ckpt}")
        vl = f"{self.last_val:.4f}" if self.last_val is not None else "n/a"
        if self.step == start_step and stopped == "max_steps":
            self.log(f"nothing to train: the run is already complete at step {self.step} (checkpoint {last_ckpt}); "
                     f"evaluate it with `antimatter eval`, or raise train.max_steps (or train.max_minutes) to go on")
            return summary
        self.log(f"train done: step {self.step}, val loss {vl}, {summary['tokens_per_s'] or 0:,.0f} tokens/s, "
                 f"{seconds:.1f}s, checkpoint {last_ckpt}")
        return summary

    def _fix_budget(self, clock: _TrainClock, step_seconds: list[float]) -> None:
        """Time-budgeted run: from the median of the steps timed so far (a load spike or a slow first step
        moves a mean, not a median), fix the step count so the schedule's decay ends when train.max_minutes
        of training time does. Rank 0 decides; every rank gets the same number."""
        used = clock.now()
        per_step = max(statistics.median(step_seconds), 1e-9)
        timed_steps = len(step_seconds)
        budget_s = self.t.max_minutes * 60.0
        steps = self.step + max(0, int((budget_s - used) / per_step))
        steps = int(broadcast_object(steps, self.d))
        self.max_steps = steps
        self.budget = {"minutes": self.t.max_minutes, "max_steps": steps, "seconds_per_step": per_step,
                       "timed_steps": timed_steps, "fixed_at_step": self.step, "train_seconds_at_fix": used}
        self.log(f"time budget {self.t.max_minutes:g} min: {per_step * 1000:.1f} ms a step over {timed_steps} "
                 f"timed steps -> {steps:,} steps ({steps * self.global_tokens:,} tokens), the schedule "
                 f"({self.t.schedule}) ends at step {steps:,}; compile/first step took {self.compile_seconds:.1f}s")

    def _eval_every(self) -> int:
        """Steps between val-loss measurements: train.eval_interval, or with a time budget budget_evals
        times over the run (none before the step count is fixed)."""
        if self.t.max_minutes <= 0:
            return self.t.eval_interval
        if self.max_steps == UNDECIDED or self.t.budget_evals <= 0:
            return 0
        return max(1, math.ceil(self.max_steps / self.t.budget_evals))

    def _optimizer_step(self, finite: torch.Tensor) -> None:
        """Step every optimizer, skipping a step whose loss or gradient is not finite without a host sync
        where possible: fused AdamW takes the flag on the device; Muon steps on zeroed gradients and then puts
        back its matrices and momentum buffers as they were (a copy of each, selected on the device); the
        unfused fallback reads the flag on the host."""
        adamw = self.optimizers[-1]
        for opt in self.optimizers[:-1]:
            if self.scaler is not None:
                self.scaler.step(opt)  # skips the step itself when gradients overflowed
            else:
                _step_unless_nonfinite(opt, finite)
        if self.scaler is not None:
            self.scaler.step(adamw)  # skips the step itself when gradients overflowed
            self.scaler.update()
        elif adamw.defaults.get("fused"):
            adamw.found_inf = (~finite).float()  # fused AdamW skips the update on the device
            adamw.step()
            del adamw.found_inf
        elif bool(finite):  # not fused: the skip needs the flag on the host
            adamw.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    # ----------------------------------------------------------------------------- evaluation
    def _eval_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from antimatter.tokens import ShardError, eval_windows

        val_dir = self.tokens_dir / "val"
        if not sorted(val_dir.glob("*.bin")) or self.t.eval_steps == 0:
            self.log(f"no validation tokens in {val_dir}: val loss is not measured")
            return []
        cap = max(0, self.t.eval_steps) * self.t.micro_batch_size * self.seq_len
        try:
            return list(eval_windows(val_dir, self.seq_len, self.t.micro_batch_size, max_tokens=cap,
                                     vocab_size=self.cfg.model.vocab_size))
        except ShardError:
            raise  # a damaged shard is refused, not skipped: the user would not see val loss go missing
        except UserError as e:
            self.log(f"validation skipped: {e}")
            return []

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean val loss per target token over the first eval_steps batches, split across ranks (every
        rank runs the same number of forwards, as FSDP needs; padding batches weigh nothing)."""
        if not self.eval_batches:
            return None
        d, dev = self.d, self.device
        n = len(self.eval_batches)
        per_rank = math.ceil(n / d.world_size)
        mixed = autocast(dev, self.dtype)
        self.wrapped.eval()
        sums = torch.zeros(2, device=dev, dtype=torch.float64)
        for j in range(per_rank):
            i = d.rank + j * d.world_size
            x, y = self.eval_batches[i if i < n else 0]
            x, y = x.to(dev), y.to(dev)
            with mixed:
                loss = self.model(x, y)
            count = (y != -1).sum()
            if i < n:
                sums[0] += loss.double() * count
                sums[1] += count
        self.wrapped.train()
        all_reduce_sum(sums, d)
        total, count = sums.tolist()
        return total / count if count else None

    # ----------------------------------------------------------------------------- checkpoints
    def save(self, data_state: dict[str, int]) -> Path | None:
        """Gather the full state (every rank takes part under FSDP), rank 0 writes it atomically."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        d = self.d
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.model, options=opts)
        optim_sd = get_optimizer_state_dict(self.model, self.optimizers, options=opts)
        rngs = gather_objects(rng_state(self.device), d)
        bad = None
        if d.is_main:  # non-finite weights (or val loss) are never a checkpoint, never `latest` or `best`
            nonfinite = [k for k, v in model_sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
            if nonfinite:
                bad = f"{len(nonfinite)} weight tensors (e.g. {nonfinite[0]}) are not finite"
            elif self.last_val is not None and not math.isfinite(self.last_val):
                bad = f"the val loss is {self.last_val}"
        bad = broadcast_object(bad, d)
        if bad:
            last = ckpt_io.read_pointer(self.ckpt_root, "latest")
            raise UserError(f"training diverged at step {self.step}: {bad}, so no checkpoint was written; last "
                            f"good checkpoint: {self.ckpt_root / last if last else 'none'}. Lower train.lr (or "
                            f"raise train.warmup_steps), then resume")
        path = None
        if d.is_main:
            best = self.last_val is not None and self.last_val < self.best_val
            if best:
                self.best_val = self.last_val
            state = {"step": self.step, "tokens_seen": self.tokens_seen, "data": data_state,
                     "optimizer": optim_sd, "scaler": self.scaler.state_dict() if self.scaler else None,
                     "rng": rngs, "world_size": d.world_size, "accum": self.accum,
                     "micro_batch_size": self.t.micro_batch_size, "global_batch_tokens": self.global_tokens,
                     "val_loss": self.last_val, "best_val_loss": self.best_val,
                     "nonfinite_total": self.nonfinite_total, "train_seconds": self.train_seconds,
                     "optimizer_name": self.t.optimizer, "tokenizer_sha256": self.tokenizer_sha256,
                     "budget": self.budget}
            t0 = time.perf_counter()
            path = ckpt_io.save_checkpoint(self.ckpt_root, self.step, model_sd, state, self.cfg, best=best,
                                           keep_last=self.t.keep_last)
            self.log(f"checkpoint {path} ({time.perf_counter() - t0:.1f}s){' best' if best else ''}")
        path = broadcast_object(str(path) if path else None, d)
        self.best_val = broadcast_object(self.best_val, d)
        return Path(path) if path else None

    # -------------------------------------------------------------------------------- logging
    def _flops(self) -> tuple[float, float | None]:
        try:
            from antimatter.model.sizing import flops_per_token, peak_flops
        except ImportError:
            return 0.0, None
        fpt = flops_per_token(self.cfg.model, self.seq_len)
        if self.device.type != "cuda":
            return fpt, None
        return fpt, peak_flops(torch.cuda.get_device_name(self.device), self.dtype)

    def _write_metrics(self, m: dict[str, Any]) -> None:
        if not self.d.is_main:
            return
        with open(self.log_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(m) + "\n")
        if self.tb is not None:
            for k, v in m.items():
                if k not in ("step",) and isinstance(v, int | float):
                    self.tb.add_scalar(TB_NAMES.get(k, f"train/{k}"), v, m["step"])

    def _trim_metrics(self) -> None:
        """On resume, drop log lines of steps after the checkpoint (they will be logged again)."""
        path = self.log_dir / "metrics.jsonl"
        if not path.is_file():
            return
        keep = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut by a kill or a full disk: dropped, the step is logged again
                continue
            if isinstance(row, dict) and row.get("step", 0) <= self.step:
                keep.append(line)
        path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")

