"""The training loop: one file, read top to bottom.

    train(cfg, run_dir)  ->  summary dict

One code path for 1 CPU, 1 GPU, N GPUs and several nodes (torchrun; DDP or FSDP2). The model is built plain
(model/gpt.py) and made ready to train from outside by train/parallelize.py: fp8, activation checkpointing,
DDP / FSDP2, torch.compile. Each optimizer step (`Trainer.train_step`):

    lr from the schedule (a pure function of the step)
    fetch micro_batch x accum windows (this rank's share of the global batch), copy them to the device
    for each micro-batch: forward (autocast) + backward, gradient all-reduce only on the last one
    unscale (fp16), clip, and a fused AdamW step that is skipped ON THE DEVICE when the loss or the
    gradient norm is not finite (no host-device sync)

Around it the loop (`Trainer._loop`) keeps the cadence: every log_interval the meter (train/metrics.py) reads
the interval's sums (the only sync) and logs them; every eval_interval a val loss; every ckpt_interval (and at
the end, and on SIGTERM/SIGINT) a checkpoint.

The global batch in tokens is fixed by the config; micro-batch x accumulation x world size is derived
from it, so a run gives the same optimisation on any number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from antimatter import checkpoint as ckpt_io
from antimatter.config import ModelConfig, RunConfig, save_config
from antimatter.device import autocast, resolve_dtype
from antimatter.errors import UserError
from antimatter.export import init_weights_from
from antimatter.files import exclusive_lock
from antimatter.model.accel import attention_backend
from antimatter.model.gpt import GPT
from antimatter.model.sizing import flops_per_token, peak_flops
from antimatter.provenance import sha256_file
from antimatter.tokens import (
    ShardError,
    TokenWindows,
    check_tokenizer,
    eval_windows,
    read_header,
    read_meta,
    recorded_tokenizer,
)
from antimatter.train.distributed import (
    Dist,
    StopFlag,
    all_reduce_sum,
    broadcast_object,
    gather_objects,
    grad_sync,
    init_distributed,
    shutdown,
)
from antimatter.train.estimate import estimate_message
from antimatter.train.metrics import Meter, StepStats, TrainClock, trim_metrics
from antimatter.train.optim import build_optimizers, lr_factor, set_lr
from antimatter.train.parallelize import parallelize

UNDECIDED = 2**62  # the step count of a time-budgeted run before its first steps are timed
# A budgeted run times CALIBRATION_STEPS steps one by one, after the compiling step and CALIBRATION_SKIP more
# (the first steps run slower: allocator and cache warm-up); their median fixes the step count
CALIBRATION_SKIP, CALIBRATION_STEPS = 5, 10
# A step-count run logs its estimated time to finish after ESTIMATE_STEPS timed steps past the compiling one,
# or sooner once ESTIMATE_SECONDS of them have passed (a slow CPU run learns it after one or two steps)
ESTIMATE_STEPS, ESTIMATE_SECONDS = 3, 20.0


def train(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """Train `cfg.model` on `run_dir/tokens`, writing checkpoints and logs into `run_dir`."""
    dist = init_distributed(cfg.train.device)
    try:
        return Trainer(cfg, Path(run_dir), dist).fit()
    finally:
        shutdown(dist)


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


def _tuplify(value):
    return tuple(_tuplify(v) for v in value) if isinstance(value, list | tuple) else value


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


NO_RESUME = ("none", "", "no", "false")  # train.resume values that start afresh

# model settings that may change on resume: a label, regularisation, how fresh weights are drawn, and the
# longest context (learned positions change shape with it, which the weights check refuses)
RESUME_MAY_CHANGE = ("preset", "dropout", "init_std", "zero_init_proj", "block_size")


def computed_by(m: ModelConfig) -> dict[str, Any]:
    """The model settings that decide what its weights compute ("auto" choices resolved): a resume that
    changes one (a tied head, RoPE's base, the soft-cap) would go on training another function."""
    out = {f.name: getattr(m, f.name) for f in dataclasses.fields(m) if f.name not in RESUME_MAY_CHANGE}
    out.update(norm=m.norm_type, position=m.position_type, activation=m.activation_type, n_kv_head=m.kv_heads,
               d_ff=m.ffn_dim)
    if m.position_type != "rope":
        del out["rope_theta"]
    return out


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, dist: Dist):
        self.cfg, self.train_cfg, self.run_dir, self.dist = cfg, cfg.train, run_dir, dist
        self.device = dist.device
        self.ckpt_root = ckpt_io.checkpoints_dir(run_dir)
        self.log_dir = run_dir / "logs"
        self.tokens_dir = run_dir / "tokens"
        self.seq_len = cfg.seq_len
        self.global_tokens, self.accum_steps = batch_geometry(
            self.train_cfg.global_batch_tokens, self.train_cfg.micro_batch_size, self.seq_len, dist.world_size)
        self.dtype = resolve_dtype(self.train_cfg.dtype, self.device)
        self.mixed_precision = autocast(self.device, self.dtype)
        self._check_settings()
        self._check_vocab()
        self._check_tokenizer()
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls that remain
            torch.backends.cudnn.allow_tf32 = True
        self.meter: Meter | None = None  # from the start of the loop
        self.set_up: dict[str, float] = {}  # set-up phase -> perf_counter at its end (logged before the loop)
        # train.log lines of the set-up, held until the start is accepted and its logs/ is ready (_write_held_log)
        self._held_log: list[str] | None = []

    # ---------------------------------------------------------------------------------- checks
    def _check_settings(self) -> None:
        tc = self.train_cfg
        if self.dtype == "fp16" and tc.parallel == "fsdp" and self.dist.enabled:
            raise UserError("train.parallel=fsdp supports bf16 and fp32, not fp16: use train.dtype=bf16 "
                            "or fp32, or train.parallel=ddp on GPUs without bf16")

    def _check_vocab(self) -> None:
        meta = read_meta(self.tokens_dir)
        self.val_bytes_per_token = None  # for val loss in bits per byte (a figure free of the tokenizer)
        if meta is not None:
            vocab = meta["vocab_size"]
            val = (meta.get("splits") or {}).get("val") or {}
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
        tok_file = self.run_dir / "tokenizer" / "tokenizer.json"
        actual = sha256_file(tok_file) if tok_file.is_file() else None
        if actual:
            check_tokenizer(self.tokens_dir, tok_file, actual)
        # rank 0's: every rank then takes the same decision on resume
        self.tokenizer_sha256 = broadcast_object(actual or recorded_tokenizer(self.tokens_dir), self.dist)

    def _set_aside_earlier_training(self) -> None:
        """train.resume=none in a run that has checkpoints: start afresh without writing over them (the step
        folders, `best`, `latest`) or cutting its metrics log. They move to checkpoints.N and logs.N."""
        if self.train_cfg.resume not in NO_RESUME or not ckpt_io.list_checkpoints(self.ckpt_root):
            return
        n = 1
        while any((self.run_dir / f"{name}.{n}").exists() for name in ("checkpoints", "logs")):
            n += 1
        moved = []
        for name in ("checkpoints", "logs"):
            if (self.run_dir / name).exists():
                (self.run_dir / name).rename(self.run_dir / f"{name}.{n}")
                moved.append(f"{name}.{n}")
        self.log_dir.mkdir(parents=True)  # the log line below starts this run's own logs/
        self.log(f"train.resume=none: this run's earlier training is kept in {' and '.join(moved)} of "
                 f"{self.run_dir} (nothing deleted); this one starts at step 0")

    def log(self, msg: str) -> None:
        """Rank 0: to stderr (above the progress bar) and to logs/train.log."""
        if not self.dist.is_main:
            return
        tqdm.write(msg, file=sys.stderr)
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n"
        if self._held_log is not None:
            self._held_log.append(line)
            return
        with open(self.log_dir / "train.log", "a", encoding="utf-8") as f:
            f.write(line)

    def _write_held_log(self) -> None:
        """The set-up's log lines into logs/train.log: this start's (after _set_aside_earlier_training), or,
        for a start refused during its set-up, the run's current log."""
        held, self._held_log = self._held_log, None
        if held and self.dist.is_main:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            with open(self.log_dir / "train.log", "a", encoding="utf-8") as f:
                f.writelines(held)

    # ---------------------------------------------------------------------------------- set-up
    def _build(self) -> None:
        """The model and its starting weights, parallelism, optimizers, data and counters; then the rest of a
        resumed run's state."""
        torch.manual_seed(self.train_cfg.seed)
        random.seed(self.train_cfg.seed)
        state, weights = self._read_start()  # both only on rank 0
        # weights to load (rank 0) or to receive from rank 0: no random initialisation to overwrite
        loaded = self.resume_from is not None or bool(self.train_cfg.init_from)  # what _read_start read
        # built on the training device: initialised there (or loaded into), never drawn on the CPU and copied
        model = GPT.for_weights(self.cfg.model, self.device)
        if not loaded:
            model.reset_parameters()
        model.loss_chunk_tokens = self.train_cfg.loss_chunk_tokens
        if weights is not None:
            self._load_weights(model, weights)
        self.set_up[f"model on {self.device}"] = time.perf_counter()
        parts = parallelize(model, self.train_cfg, self.dist, self.dtype, log=self.log)
        self.model = parts.model  # the uncompiled module: its state dicts have clean names
        self.wrapped, self.step_model = parts.wrapped, parts.step
        self._share_weights_under_fsdp(weights)
        self.trainable_params = [p for p in self.model.parameters() if p.requires_grad]
        self.max_grad_norm = self.train_cfg.grad_clip if self.train_cfg.grad_clip > 0 else math.inf
        # after sharding: FSDP2 params are DTensors. [AdamW] or [Muon, AdamW]; AdamW is last and fused
        self.optimizers = build_optimizers(self.model, self.train_cfg, self.device.type)
        self.set_up["parallelism and optimizers"] = time.perf_counter()
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == "fp16" else None
        self.loader = TokenWindows(self.tokens_dir / "train", self.seq_len, seed=self.train_cfg.seed,
                                   rank=self.dist.rank, world_size=self.dist.world_size,
                                   vocab_size=self.cfg.model.vocab_size)
        self._reset_counters()
        self.set_up["train data"] = time.perf_counter()
        if self.resume_from is not None:
            optim_sd = state.pop("optimizer") if self.dist.is_main else {}
            self._restore(broadcast_object(state, self.dist), optim_sd)
            self.set_up["resumed state"] = time.perf_counter()

    def _find_resume(self) -> Path | None:
        resume = self.train_cfg.resume
        if resume in NO_RESUME:
            return None
        if resume == "auto":
            return ckpt_io.find_resume(self.ckpt_root)
        return ckpt_io.resolve_checkpoint(Path(resume), "latest")

    def _read_start(self) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor] | None]:
        """(train state, weights) to start from: a checkpoint to resume, else train.init_from's weights, else
        nothing. Rank 0 reads them (other nodes need not see the same disk); other ranks get (None, None)."""
        resume = self._find_resume() if self.dist.is_main else None
        resume = broadcast_object(str(resume) if resume else None, self.dist)
        self.resume_from = Path(resume) if resume else None
        init_from = self.train_cfg.init_from
        if not self.dist.is_main:
            return None, None
        if self.resume_from is not None:
            state = ckpt_io.load_train_state(self.resume_from)  # verifies the manifest first
            # what the saved weights compute, for _check_resumable on every rank (not written back anywhere)
            state["_saved_model"] = computed_by(ckpt_io.load_config_from_checkpoint(self.resume_from).model)
            return state, ckpt_io.load_weights(self.resume_from, self.cfg.model.tie_embeddings, verify=False)
        if init_from:
            src, weights = init_weights_from(init_from, self.cfg.model, self.run_dir / "tokenizer" / "tokenizer.json",
                                             self.tokenizer_sha256)
            self.log(f"initialised weights from {src}")
            return None, weights
        return None, None

    @staticmethod
    def _load_weights(model: GPT, weights: dict[str, torch.Tensor]) -> None:
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

    def _share_weights_under_fsdp(self, weights: dict[str, torch.Tensor] | None) -> None:
        """FSDP2 shards rank 0's model as it finds it on each rank: rank 0's loaded weights are broadcast
        into the shards (DDP broadcasts them when it wraps)."""
        if not (self.dist.enabled and self.train_cfg.parallel == "fsdp"):
            return
        if broadcast_object(weights is not None, self.dist):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, weights if self.dist.is_main else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

    def _reset_counters(self) -> None:
        """A fresh run's counters; _restore overwrites them from a checkpoint."""
        self.step, self.tokens_seen, self.best_val, self.last_val = 0, 0, math.inf, None
        self.nonfinite_total = 0
        # the step count: the config's, or (time budget) chosen after the first steps and kept across resumes
        self.budget: dict[str, Any] | None = None
        self.max_steps = self.train_cfg.max_steps if self.train_cfg.max_minutes <= 0 else UNDECIDED
        self.compile_seconds = 0.0
        self.first_step_at: float | None = None  # wall clock (time.time()) when this process's first step ended
        self.train_seconds = 0.0  # training time so far (compile, evaluation and checkpoints not counted)

    def _restore(self, state: dict[str, Any], optim_sd: dict[str, Any]) -> None:
        """Everything but the weights: optimizer (rank 0's full copy, sharded/broadcast by the call), scaler,
        data position, counters and this rank's RNG streams."""
        self._check_resumable(state)
        self._restore_optimizers(optim_sd)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["data"])
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.best_val = float(state.get("best_val_loss", math.inf))
        self.last_val = state.get("val_loss")
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        if self.train_cfg.max_minutes > 0 and state.get("budget"):
            self.budget = dict(state["budget"])
            self.max_steps = int(self.budget["max_steps"])
            if abs(self.budget["minutes"] - self.train_cfg.max_minutes) > 1e-9:
                self.log(f"note: train.max_minutes is {self.train_cfg.max_minutes:g} but this run fixed its "
                         f"schedule for {self.budget['minutes']:g} minutes ({self.max_steps:,} steps): keeping "
                         f"that schedule")
        rngs = state["rng"]
        set_rng_state(rngs[self.dist.rank] if self.dist.rank < len(rngs) else rngs[0], self.device)
        self._report_resume(state)

    def _check_resumable(self, state: dict[str, Any]) -> None:
        """The same model function, tokens and optimizer as the checkpoint's."""
        saved, now = state.pop("_saved_model", None) or {}, computed_by(self.cfg.model)
        changed = [k for k in now if k in saved and saved[k] != now[k]]
        if changed:
            k = changed[0]
            raise UserError(f"{self.resume_from} was trained with model.{k}={saved[k]}, not {now[k]}: resume with "
                            f"the model settings it was trained with, or train a new run (--name NEW)")
        saved_tok = state.get("tokenizer_sha256")
        if saved_tok and self.tokenizer_sha256 and saved_tok != self.tokenizer_sha256:
            raise UserError(f"the training tokens changed since this state was saved: {self.resume_from} was "
                            f"trained on tokens of another tokenizer (sha256 {saved_tok[:12]}) than those in "
                            f"{self.tokens_dir} (made by {self.tokenizer_sha256[:12]}): resume with the "
                            f"tokens and tokenizer it was trained on, or train a new run (--name NEW)")
        saved_opt, optimizer = state.get("optimizer_name", "adamw"), self.train_cfg.optimizer
        if saved_opt != optimizer:
            raise UserError(f"{self.resume_from} was trained with train.optimizer={saved_opt}, not "
                            f"{optimizer}: resume with train.optimizer={saved_opt}, or train a new run from "
                            f"its weights (--name NEW train.init_from={self.resume_from})")

    def _restore_optimizers(self, optim_sd: dict[str, Any]) -> None:
        """The checkpoint's state (moments, momentum buffers, step counts) with this config's hyperparameters:
        a resume at a lower train.lr (the advice after a divergence) must step at the new rate."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=self.dist.enabled)
        fresh = [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in self.optimizers]
        set_optimizer_state_dict(self.model, self.optimizers, optim_sd, options=opts)
        for opt, groups in zip(self.optimizers, fresh):
            for g, hyper in zip(opt.param_groups, groups):
                g.update(hyper)

    def _report_resume(self, state: dict[str, Any]) -> None:
        world = self.dist.world_size
        saved_world, saved_global = int(state.get("world_size", 1)), int(state.get("global_batch_tokens", 0))
        self.log(f"resumed from {self.resume_from} at step {self.step:,} ({self.tokens_seen:,} tokens seen)")
        if saved_global and saved_global != self.global_tokens:
            self.log(f"warning: global batch changed from {saved_global:,} to {self.global_tokens:,} tokens per "
                     f"step: the optimisation and the data order per step differ from the original run")
        elif saved_world != world:
            self.log(f"note: resuming a {saved_world}-process run on {world} processes: the global batch "
                     f"({self.global_tokens:,} tokens) and the windows of every step are kept; only the "
                     f"micro-batch accumulation ({state.get('accum')} -> {self.accum_steps}) and so the summation "
                     f"order of gradients change, and per-rank RNG streams (dropout) are not carried over")

    # ------------------------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        """Train, holding the run folder's lock: a second `antimatter train` on the same run is refused (it
        would interleave checkpoints and metrics), whichever rank learns it."""
        with contextlib.ExitStack() as stack:
            refused = None
            if self.dist.is_main:
                try:
                    stack.enter_context(exclusive_lock(self.run_dir / "train.lock", f"run {self.run_dir}"))
                except UserError as e:
                    refused = str(e)
            if refused := broadcast_object(refused, self.dist):
                raise UserError(refused)
            return self._fit()

    def _fit(self) -> dict[str, Any]:
        self.set_up["started"] = time.perf_counter()
        try:
            self._build()
            if self.step == 0 and self.max_steps == 0:  # a fresh run: "already complete at step 0" is wrong
                raise UserError("train.max_steps is 0 and train.max_minutes is off: nothing would be trained; "
                                "set train.max_steps (e.g. 1000) or train.max_minutes")
            if self.dist.is_main:  # only now: a start refused above (init_from, compile backend) moves nothing
                self._set_aside_earlier_training()
                self.log_dir.mkdir(parents=True, exist_ok=True)
                save_config(self.cfg, self.run_dir / "config.yaml")
        finally:
            self._write_held_log()
        if self.dist.is_main:
            trim_metrics(self.log_dir / "metrics.jsonl", self.step)
        self.eval_batches = self._eval_batches()
        self.set_up["val batches"] = time.perf_counter()
        self.flops_per_token, self.peak_flops = self._flops()
        self._log_start()
        try:  # the attention preference is read when the step is traced, so it wraps the whole loop
            with _Signals() as signals, attention_backend(self.train_cfg.attention):
                return self._loop(signals)
        finally:
            if self.meter is not None:  # the bar closed before an error is printed, not after it at exit
                self.meter.close()

    def _log_start(self) -> None:
        tc, world = self.train_cfg, self.dist.world_size
        until = self.max_steps if self.max_steps != UNDECIDED else f"(fit to {tc.max_minutes:g} minutes)"
        self.log(f"train: {self.model.num_params():,} parameters, {self.dtype} on {self.device} x{world} "
                 f"({tc.parallel if self.dist.enabled else 'single process'}); global batch "
                 f"{self.global_tokens:,} tokens = micro-batch {tc.micro_batch_size} x seq_len {self.seq_len} x "
                 f"{self.accum_steps} accumulation x {world} processes; steps {self.step}->{until}")

    def _log_set_up(self) -> None:
        """Where the seconds before the first step went, so a slow start can be told apart from a slow compile."""
        marks = list(self.set_up.items())
        parts = ", ".join(f"{name} {end - prev:.1f}s" for (_, prev), (name, end) in zip(marks, marks[1:]))
        then = "; the first step compiles next" if self.train_cfg.compile else ""
        self.log(f"set-up {marks[-1][1] - marks[0][1]:.1f}s: {parts}{then}")

    def _loop(self, signals: _Signals) -> dict[str, Any]:
        """The cadence: a step; when due a log line, an evaluation, a checkpoint; a stop."""
        stop = StopFlag(self.dist)
        self.clock = TrainClock(self.device, self.train_seconds)
        self.meter = self._open_meter()  # before the loop's time starts: TensorBoard is slow to import
        self.start_step, self.loop_started = self.step, time.perf_counter()
        self.set_up["logging"] = self.loop_started
        self._log_set_up()
        self.last_checkpoint: Path | None = self.resume_from
        log_every = max(1, self.train_cfg.log_interval)
        stopped = "max_steps"
        self.wrapped.train()
        while self.step < self.max_steps and not (0 < self.train_cfg.stop_step <= self.step):
            stats = self.train_step()
            self.step += 1
            self.tokens_seen += stats.tokens
            self.meter.record(stats)
            self._time_step(stop)
            last = self.step >= self.max_steps
            elapsed = time.perf_counter() - self.loop_started
            stop_reason = self._stop_reason(signals, stop, elapsed, last)
            if self.step % log_every == 0 or last or stop_reason:
                self._log_interval(stats.lr, elapsed)
            self._evaluate_and_checkpoint(final=last or stop_reason is not None)
            if stop_reason:
                stopped = stop_reason
                break
        return self._finish(stopped, signals)

    def _open_meter(self) -> Meter:
        return Meter(log_dir=self.log_dir, is_main=self.dist.is_main, tensorboard=self.train_cfg.tensorboard,
                     step=self.step, max_steps=self.max_steps if self.max_steps != UNDECIDED else None,
                     global_tokens=self.global_tokens, flops_per_token=self.flops_per_token,
                     peak_flops=self.peak_flops, world_size=self.dist.world_size, device=self.device,
                     clock=self.clock, val_bytes_per_token=self.val_bytes_per_token)

    def train_step(self) -> StepStats:
        """One optimizer step at self.step: the schedule's learning rate, this rank's micro-batches forward
        and backward, clipping, and the optimizers' step, skipped on the device when the loss or the gradient
        norm is not finite. Nothing here waits for the device."""
        lr_scale = lr_factor(self.step, self.train_cfg, self.max_steps)
        set_lr(self.optimizers, lr_scale)
        loss = self._forward_backward(self._next_batches())
        grad_norm = self._clip_gradients()
        loss /= self.accum_steps
        if self.dist.enabled:  # the mean over ranks, on the device (no sync): every rank decides alike
            all_reduce_sum(loss, self.dist).div_(self.dist.world_size)
        applied = torch.isfinite(grad_norm) & torch.isfinite(loss)
        self._optimizer_step(applied)
        # an overflow of the scaled fp16 grads is routine (the scaler skips the step), not bad
        nonfinite = ~torch.isfinite(loss) if self.scaler is not None else ~applied
        return StepStats(loss=loss, grad_norm=grad_norm, applied=applied, nonfinite=nonfinite,
                         lr=self.train_cfg.lr * lr_scale, tokens=self.global_tokens)

    def _next_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The step's accum_steps micro-batches of this rank, on the device."""
        batches = [self.loader.next_batch(self.train_cfg.micro_batch_size) for _ in range(self.accum_steps)]
        if self.device.type == "cuda":  # pinned host memory -> asynchronous copies that overlap compute
            dev = self.device
            batches = [(x.pin_memory().to(dev, non_blocking=True), y.pin_memory().to(dev, non_blocking=True))
                       for x, y in batches]
        return batches

    def _forward_backward(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Forward and backward of each micro-batch, the gradients all-reduced on the last one only. Returns
        the sum of the micro-batch losses (detached, float32)."""
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        for i, (x, y) in enumerate(batches):
            with grad_sync(self.wrapped, i == self.accum_steps - 1):
                with self.mixed_precision:
                    loss = self.step_model(x, y)
                loss_sum += loss.detach().float()
                scaled = loss / self.accum_steps
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss_sum

    def _clip_gradients(self) -> torch.Tensor:
        """Unscale (fp16), clip to train.grad_clip; returns the gradient norm before clipping."""
        if self.scaler is not None:
            for opt in self.optimizers:
                self.scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(self.trainable_params, self.max_grad_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        return norm

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

    def _time_step(self, stop: StopFlag) -> None:
        """The first step of this process compiles: training time starts after it. A step-count run then
        times its next few steps (a sync each) and logs its estimated time to finish; a time-budgeted run
        times each step alone until its step count is fixed."""
        if self.step == self.start_step + 1:
            self.clock.start()
            self.compile_seconds = time.perf_counter() - self.loop_started
            # wall clock, not perf_counter: a launcher (benchmarks/startup.py) subtracts its own launch time
            self.first_step_at = time.time()
            self.log(f"first step done: compile/first step took {self.compile_seconds:.1f}s "
                     f"(unix time {self.first_step_at:.3f})")
            self.step_ends = [self.clock.started_at]
            self.estimate_from = self.clock.now()
            self.estimated = self.max_steps == UNDECIDED  # a time budget logs its own line
        elif not self.estimated:
            self.clock.sync()
            timed, seconds = self.step - self.start_step - 1, self.clock.now() - self.estimate_from
            if timed >= ESTIMATE_STEPS or seconds >= ESTIMATE_SECONDS:
                self.estimated = True
                if self.step < self.max_steps:
                    for line in estimate_message(self.step, self.max_steps, seconds / timed, timed,
                                                 on_cpu=self.device.type == "cpu"):
                        self.log(line)
        elif self.max_steps == UNDECIDED:
            self.clock.sync()
            self.step_ends.append(time.perf_counter())
            # a run cut into processes too short to time their steps fixes its count once the budget is spent
            # (on any rank: the host-side flag every rank agrees on, as for a stop)
            spent = stop.any(self.clock.now() >= self.train_cfg.max_minutes * 60.0)
            if len(self.step_ends) > CALIBRATION_SKIP + CALIBRATION_STEPS or spent:
                skip = CALIBRATION_SKIP if len(self.step_ends) > CALIBRATION_SKIP + 1 else 0
                timed = self.step_ends[skip:]
                self._fix_budget([b - a for a, b in zip(timed, timed[1:])])
                self.meter.set_total(self.max_steps)

    def _fix_budget(self, step_seconds: list[float]) -> None:
        """Time-budgeted run: from the median of the steps timed so far (a load spike or a slow first step
        moves a mean, not a median), fix the step count so the schedule's decay ends when train.max_minutes
        of training time does. Rank 0 decides; every rank gets the same number."""
        tc = self.train_cfg
        used = self.clock.now()
        per_step = max(statistics.median(step_seconds), 1e-9)
        timed_steps = len(step_seconds)
        steps = self.step + max(0, int((tc.max_minutes * 60.0 - used) / per_step))
        steps = int(broadcast_object(steps, self.dist))
        self.max_steps = steps
        self.budget = {"minutes": tc.max_minutes, "max_steps": steps, "seconds_per_step": per_step,
                       "timed_steps": timed_steps, "fixed_at_step": self.step, "train_seconds_at_fix": used}
        self.log(f"time budget {tc.max_minutes:g} min: {per_step * 1000:.1f} ms a step over {timed_steps} "
                 f"timed steps -> {steps:,} steps ({steps * self.global_tokens:,} tokens), the schedule "
                 f"({tc.schedule}) ends at step {steps:,}; compile/first step took {self.compile_seconds:.1f}s")

    def _stop_reason(self, signals: _Signals, stop: StopFlag, elapsed: float, last: bool) -> str | None:
        """Why to stop after this step, before max_steps (every rank agrees): 'stop_step', 'signal' or
        'time'; None to go on."""
        tc = self.train_cfg
        at_stop_step = 0 < tc.stop_step <= self.step and not last
        if not (at_stop_step or stop.any(
                signals.received is not None or (tc.max_time_s > 0 and elapsed >= tc.max_time_s
                                                 and self.dist.is_main))):
            return None
        return "signal" if signals.received else "stop_step" if at_stop_step else "time"

    def _log_interval(self, lr: float, elapsed: float) -> None:
        """Read and log the steps since the last log; stop a run that diverged."""
        interval = self.meter.read()  # the one host-device sync
        self.nonfinite_total += interval.nonfinite_new
        self.meter.log_train(self.step, self.tokens_seen, lr, elapsed, interval, self.nonfinite_total)
        if interval.nonfinite_run >= self.train_cfg.max_nonfinite:
            where = self.last_checkpoint if self.last_checkpoint else "none yet"
            raise UserError(
                f"training diverged: {interval.nonfinite_run} optimizer steps in a row up to step {self.step} "
                f"had a non-finite loss or gradient (all skipped); last good checkpoint: {where}. Lower "
                f"train.lr, raise train.warmup_steps or use train.dtype=bf16/fp32, then resume")

    def _evaluate_and_checkpoint(self, final: bool) -> None:
        """A val loss and a checkpoint when due (a checkpoint always comes with a val loss; the last step
        and a stop take both), in a pause of the training clock."""
        tc = self.train_cfg
        ckpt_due = (tc.ckpt_interval > 0 and self.step % tc.ckpt_interval == 0) or final
        eval_every = self._eval_every()
        eval_due = (eval_every > 0 and self.step % eval_every == 0) or ckpt_due
        if not (eval_due or ckpt_due):
            return
        self.clock.pause()  # evaluation and checkpoints are not training time
        self.train_seconds = self.clock.now()
        if eval_due:
            self.last_val = self.evaluate()
            self.meter.log_eval(self.step, self.tokens_seen, self.last_val)
        if ckpt_due:
            self.last_checkpoint = self.save()
        self.meter.exclude_pause(self.clock.resume())  # tokens/s counts training time only

    def _eval_every(self) -> int:
        """Steps between val-loss measurements: train.eval_interval, or with a time budget budget_evals
        times over the run (none before the step count is fixed)."""
        if self.train_cfg.max_minutes <= 0:
            return self.train_cfg.eval_interval
        if self.max_steps == UNDECIDED or self.train_cfg.budget_evals <= 0:
            return 0
        return max(1, math.ceil(self.max_steps / self.train_cfg.budget_evals))

    def _finish(self, stopped: str, signals: _Signals) -> dict[str, Any]:
        """The summary, and the last log lines (after the bar)."""
        self.meter.close()
        self.train_seconds = self.clock.now()
        seconds = time.perf_counter() - self.loop_started
        summary = self._summary(stopped, seconds)
        if stopped != "max_steps":
            why = {"signal": signals.received, "stop_step": "train.stop_step", "time": "train.max_time_s"}[stopped]
            self.log(f"stopped by {why} at step {self.step}: checkpoint {self.last_checkpoint}")
        if self.step == self.start_step and 0 < self.train_cfg.stop_step <= self.step < self.max_steps:
            self.log(f"nothing to train: train.stop_step ({self.train_cfg.stop_step}) is not after this run's step "
                     f"{self.step} (checkpoint {self.last_checkpoint}); raise train.stop_step, or set it to 0 to "
                     f"train on to train.max_steps ({self.max_steps})")
            return summary
        if self.step == self.start_step and stopped == "max_steps":
            self.log(f"nothing to train: the run is already complete at step {self.step} (checkpoint "
                     f"{self.last_checkpoint}); evaluate it with `antimatter eval`, or raise train.max_steps (or "
                     f"train.max_minutes) to go on")
            return summary
        val = f"{self.last_val:.4f}" if self.last_val is not None else "n/a"
        self.log(f"train done: step {self.step}, val loss {val}, {summary['tokens_per_s'] or 0:,.0f} tokens/s, "
                 f"{seconds:.1f}s, checkpoint {self.last_checkpoint}")
        return summary

    def _summary(self, stopped: str, seconds: float) -> dict[str, Any]:
        tps = self.meter.tokens_per_s((self.step - self.start_step) * self.global_tokens, seconds)
        last_row, best = self.meter.last_train_row, ckpt_io.read_pointer(self.ckpt_root, "best")
        return {
            "steps": self.step, "start_step": self.start_step, "tokens_seen": self.tokens_seen,
            "params": self.model.num_params(),
            "last_loss": last_row.get("loss"), "last_val_loss": self.last_val,
            "best_val_loss": self.best_val if math.isfinite(self.best_val) else None,
            "tokens_per_s": round(tps, 1) if tps else None,
            "mfu": last_row.get("mfu"), "seconds": round(seconds, 2), "stopped": stopped,
            "nonfinite_steps": self.nonfinite_total,
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "best_checkpoint": str(self.ckpt_root / best) if best else None,
            "train_seconds": round(self.train_seconds, 2), "compile_seconds": round(self.compile_seconds, 2),
            "first_step_at": self.first_step_at,
            "eval_checkpoint_seconds": round(self.clock.paused, 2), "budget": self.budget,
            "world_size": self.dist.world_size, "micro_batch_size": self.train_cfg.micro_batch_size,
            "accum_steps": self.accum_steps, "global_batch_tokens": self.global_tokens, "dtype": self.dtype,
            "device": str(self.device),
        }

    # ----------------------------------------------------------------------------- evaluation
    def _eval_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        val_dir = self.tokens_dir / "val"
        eval_steps, micro = self.train_cfg.eval_steps, self.train_cfg.micro_batch_size
        if not sorted(val_dir.glob("*.bin")) or eval_steps == 0:
            self.log(f"no validation tokens in {val_dir}: val loss is not measured")
            return []
        cap = max(0, eval_steps) * micro * self.seq_len
        try:
            return list(eval_windows(val_dir, self.seq_len, micro, max_tokens=cap,
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
        dist, dev = self.dist, self.device
        n = len(self.eval_batches)
        per_rank = math.ceil(n / dist.world_size)
        self.wrapped.eval()
        sums = torch.zeros(2, device=dev, dtype=torch.float64)
        for j in range(per_rank):
            i = dist.rank + j * dist.world_size
            x, y = self.eval_batches[i if i < n else 0]
            x, y = x.to(dev), y.to(dev)
            with self.mixed_precision:
                loss = self.model(x, y)
            count = (y != -1).sum()
            if i < n:
                sums[0] += loss.double() * count
                sums[1] += count
        self.wrapped.train()
        all_reduce_sum(sums, dist)
        total, count = sums.tolist()
        return total / count if count else None

    # ----------------------------------------------------------------------------- checkpoints
    def save(self) -> Path | None:
        """Gather the full state (every rank takes part under FSDP), rank 0 writes it atomically. Non-finite
        weights (or val loss) are never a checkpoint, never `latest` or `best`."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.model, options=opts)
        optim_sd = get_optimizer_state_dict(self.model, self.optimizers, options=opts)
        rngs = gather_objects(rng_state(self.device), self.dist)
        if bad := broadcast_object(self._not_finite(model_sd) if self.dist.is_main else None, self.dist):
            last = ckpt_io.read_pointer(self.ckpt_root, "latest")
            raise UserError(f"training diverged at step {self.step}: {bad}, so no checkpoint was written; last "
                            f"good checkpoint: {self.ckpt_root / last if last else 'none'}. Lower train.lr (or "
                            f"raise train.warmup_steps), then resume")
        path = self._write_checkpoint(model_sd, optim_sd, rngs) if self.dist.is_main else None
        path = broadcast_object(str(path) if path else None, self.dist)
        self.best_val = broadcast_object(self.best_val, self.dist)
        return Path(path) if path else None

    def _not_finite(self, model_sd: dict[str, torch.Tensor]) -> str | None:
        """What is not finite about the state to save, or None."""
        nonfinite = [k for k, v in model_sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if nonfinite:
            return f"{len(nonfinite)} weight tensors (e.g. {nonfinite[0]}) are not finite"
        if self.last_val is not None and not math.isfinite(self.last_val):
            return f"the val loss is {self.last_val}"
        return None

    def _write_checkpoint(self, model_sd: dict[str, torch.Tensor], optim_sd: dict[str, Any],
                          rngs: list[dict[str, Any]]) -> Path:
        """Rank 0: the checkpoint folder, `latest` and (at a new best val loss) `best`."""
        best = self.last_val is not None and self.last_val < self.best_val
        if best:
            self.best_val = self.last_val
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "data": self.loader.state_dict(),
                 "optimizer": optim_sd, "scaler": self.scaler.state_dict() if self.scaler else None,
                 "rng": rngs, "world_size": self.dist.world_size, "accum": self.accum_steps,
                 "micro_batch_size": self.train_cfg.micro_batch_size, "global_batch_tokens": self.global_tokens,
                 "val_loss": self.last_val, "best_val_loss": self.best_val,
                 "nonfinite_total": self.nonfinite_total, "train_seconds": self.train_seconds,
                 "optimizer_name": self.train_cfg.optimizer, "tokenizer_sha256": self.tokenizer_sha256,
                 "budget": self.budget}
        started = time.perf_counter()
        path = ckpt_io.save_checkpoint(self.ckpt_root, self.step, model_sd, state, self.cfg, best=best,
                                       keep_last=self.train_cfg.keep_last)
        self.log(f"checkpoint {path} ({time.perf_counter() - started:.1f}s){' best' if best else ''}")
        return path

    # -------------------------------------------------------------------------------- logging
    def _flops(self) -> tuple[float, float | None]:
        """(model FLOPs per token, the GPU's peak FLOP/s at this dtype or None): for MFU."""
        fpt = flops_per_token(self.cfg.model, self.seq_len)
        if self.device.type != "cuda":
            return fpt, None
        return fpt, peak_flops(torch.cuda.get_device_name(self.device), self.dtype)
