"""The Triton decoder: one GPT's decode step over its KV cache as the kernels of `decode_kernels`, tuned once
and replayed as one CUDA graph.

`decode_kernels.py` holds what runs on the GPU and how each kernel is launched; this module is the host side
that drives it: the step's buffers (token, position, activations, logits) and which of them each launch reads
and writes, the order of a step's launches (embedding, five a layer, head, sampling), the tuning that times
each matrix shape's block shapes and attention's launch shape, and the CUDA graph that records the step once.
The position of the new token lives in device memory, so one graph serves every step. Without a GPU the step
runs eagerly in Triton's interpreter (the tests). Needs Triton: `generate` imports this module only when it
decodes through the kernels.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import triton
from triton.runtime.errors import OutOfResources

from antimatter.compile_cache import use_compile_cache
from antimatter.model.decode import DecodeOptions, DecodeTuning
from antimatter.model.decode_kernels import (
    ACT_GELU,
    ACT_SWIGLU,
    ATTN_BLOCK_S,
    ATTN_CONFIGS,
    ATTN_WARPS,
    AttentionPartials,
    MatVec,
    SplitScratch,
    attention_splits,
    launch_attention,
    launch_embed,
    launch_greedy,
    pdl_launch,
)
from antimatter.model.gpt import GPT
from antimatter.model.quantize import is_int8

STEP_TUNE_TOP = 4  # how many of a matrix shape's fastest-alone block shapes the in-step pass times


def unsupported_reason(model: GPT) -> str | None:
    """Why this model cannot decode through these kernels (None: it can)."""
    cfg = model.cfg
    device = model.lm_head.weight.device
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "the Triton decode kernels need a CUDA GPU (or TRITON_INTERPRET=1)"
    if not cfg.is_family_standard:
        return "the kernels know GPT-2 and Llama blocks only (this model sets norm/position/activation/softcap)"
    if cfg.head_dim & (cfg.head_dim - 1):
        return f"head_dim {cfg.head_dim} is not a power of two"
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and (type(m) is not torch.nn.Linear or is_int8(m.weight)):
            return "int8 or converted Linear layers (the kernels read plain weights)"
    return None


def tuning_file() -> Path:
    """Where the decoder's tuning results persist: in the compile cache, under a name that changes with this
    module's kernels, Triton's version and torch's, since the fastest launch shape depends on all three."""
    code = (Path(__file__).parent / "decode_kernels.py").read_bytes() + Path(__file__).read_bytes()
    stamp = hashlib.sha256(code + f"{triton.__version__} {torch.__version__}".encode()).hexdigest()[:16]
    return use_compile_cache() / "antimatter_decode" / f"tuning-{stamp}.txt"


def model_tuning(model: GPT) -> DecodeTuning:
    """The tuning results of `model`'s decoders whose options carry none: kept on the model, as `generate`
    keeps its compiled steps and its decoder there, so later calls with this model time no candidate again;
    it starts from those saved on disk (`tuning_file`), so a later process does not either."""
    if "_antimatter_decode_tuning" not in model.__dict__:
        model.__dict__["_antimatter_decode_tuning"] = DecodeTuning.load(tuning_file())
    return model.__dict__["_antimatter_decode_tuning"]


class TritonDecoder:
    """The decode step of one GPT over its KV cache (set up by `GPT.setup_caches(batch, max_seq)`).

    `start(token, pos, seen, left_pad)` loads the state; each `step()` feeds each row's token at cache slot
    `pos` (rows are left-padded by `left_pad` slots, as `generate` lays out a batch), writes the next tokens
    into `token`, and advances `pos`. On a GPU the step is captured once as a CUDA graph (after one tuning
    pass over the matrix block shapes and attention's launch shape) and replayed. `options` holds the switches
    of the launches and tuning, and the tuning results this decoder reads and adds to (None there: the
    model's, `model_tuning`). `attn_splits`, `attn_block`: attention's split count and cache slots per
    iteration, fixed by the caller (tuning then leaves attention alone); None: the defaults until tuned."""

    def __init__(self, model: GPT, sample: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 attn_splits: int | None = None, greedy: bool = False, options: DecodeOptions | None = None,
                 attn_block: int | None = None):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"Triton decode: {reason}")
        use_compile_cache()  # Triton keeps the compiled kernels there: a second start skips compiling them
        cfg = model.cfg
        self.model, self.sample = model, sample
        self.options = options = options or DecodeOptions()
        self.tuning = options.tuning if options.tuning is not None else model_tuning(model)
        self.greedy = greedy  # `sample` is a plain argmax: greedy_kernel does it (and the bookkeeping)
        B, _, max_seq, _ = model.transformer.h[0].attn.kv_cache.k.shape  # (B, H_kv, max_seq, D)
        self.batch, self.max_seq = B, max_seq
        self._allocate()
        dev = self.x.device
        self.launch = pdl_launch(dev, options.pdl)
        self.scratch = SplitScratch(dev)
        self.layers, self.head = self._products()
        self.partials = AttentionPartials(B * cfg.n_head, cfg.head_dim, dev)
        self.fixed_attention = attn_splits is not None or attn_block is not None
        self.attn_block, self.attn_warps = attn_block or ATTN_BLOCK_S, ATTN_WARPS
        self.splits = attn_splits or attention_splits(max_seq, B * cfg.n_head, self.attn_block)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.tuned = False
        self.tune_report: dict = {}

    def _allocate(self) -> None:
        """The step's state and activations, in device memory: the CUDA graph reads and writes them in place."""
        cfg, B, w = self.model.cfg, self.batch, self.model.lm_head.weight
        dev, dt = w.device, w.dtype
        q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.token = torch.zeros(B, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.left_pad = torch.zeros(B, dtype=torch.long, device=dev)
        self.seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=dev)
        self.x = torch.zeros(B, cfg.d_model, dtype=dt, device=dev)
        self.qkv = torch.zeros(B, q_dim + 2 * kv_dim, dtype=dt, device=dev)
        self.y = torch.zeros(B, q_dim, dtype=dt, device=dev)
        self.h = torch.zeros(B, cfg.ffn_dim, dtype=dt, device=dev)
        self.logits = torch.zeros(B, cfg.padded_vocab_size, dtype=torch.float32, device=dev)

    def _products(self) -> tuple[list[tuple], MatVec]:
        """Each layer's (QKV product, attention module, output projection, MLP up, MLP down) over the decoder's
        buffers, and the output head."""
        model, launch = self.model, self.launch
        act = ACT_SWIGLU if model.cfg.arch == "llama" else ACT_GELU
        kw = dict(scratch=self.scratch, split_k=self.options.split_k)
        layers = []
        for block in model.transformer.h:
            a, m = block.attn, block.mlp
            layers.append((
                MatVec(a.c_attn, self.x, self.qkv, launch, norm=block.ln_1, **kw),
                a,
                MatVec(a.c_proj, self.y, self.x, launch, residual=self.x, **kw),
                MatVec(m.c_fc, self.x, self.h, launch, norm=block.ln_2, act=act, **kw),
                MatVec(m.c_proj, self.h, self.x, launch, residual=self.x, **kw),
            ))
        head = MatVec(model.lm_head, self.x, self.logits, launch, norm=model.transformer.ln_f, **kw)
        return layers, head

    def matvecs(self) -> list[MatVec]:
        return [mv for layer in self.layers for mv in (layer[0], *layer[2:])] + [self.head]

    def refresh(self) -> None:
        """Re-read what depends on the weights' values (they may have changed since the last call)."""
        for mv in self.matvecs():
            mv.refresh()

    def start(self, token: torch.Tensor, pos: int, seen: torch.Tensor, left_pad: torch.Tensor | None = None) -> None:
        self.token.copy_(token.view(self.batch))
        self.pos.fill_(pos)
        self.seen.copy_(seen)
        self.left_pad.copy_(left_pad if left_pad is not None else torch.zeros_like(self.left_pad))

    def attend(self, attn) -> None:
        """One layer's attention at the decoder's launch shape: reads `qkv`, writes the cache slot and `y`."""
        cfg = self.model.cfg
        rope = (self.model.rope_cos, self.model.rope_sin) if cfg.arch == "llama" else None
        q_gain = attn.q_norm.weight if attn.q_norm is not None else None
        k_gain = attn.k_norm.weight if attn.k_norm is not None else None
        launch_attention(self.qkv, attn.kv_cache.kv, self.pos, self.left_pad, self.y, self.partials, q_gain, k_gain,
                         rope, heads=cfg.n_head, eps=cfg.norm_eps,
                         shape=(self.attn_block, self.attn_warps, self.splits), launch=self.launch)

    def run_step(self) -> None:
        """One decode step as kernel launches (what the CUDA graph records)."""
        t, cfg = self.model.transformer, self.model.cfg
        launch_embed(self.token, self.pos, self.left_pad, t.wte.weight, t.wpe.weight if cfg.arch == "gpt2" else None,
                     self.x, self.launch)
        for qkv, attn, proj, up, down in self.layers:
            qkv()
            self.attend(attn)
            proj()
            up()
            down()
        self.head()
        if self.greedy:
            launch_greedy(self.logits, self.token, self.seen, self.pos, cfg.vocab_size, self.launch)
            return
        nxt = self.sample(self.logits[:, : cfg.vocab_size], self.seen)
        self.seen.scatter_(1, nxt.view(self.batch, 1), True)
        self.token.copy_(nxt)
        self.pos += 1

    def tune(self) -> dict:
        """Pick each matrix shape's fastest block shape (report entries of kind "matrix"), then attention's
        launch shape ("attention") and the in-step picks ("step"), as switched on. Each candidate runs every
        layer's instance of that shape back to back, captured as a CUDA graph and timed by its replays: the
        weights stream from memory as in a real step (a model's layers together do not fit in L2), with no host
        launch time in the figure. Writes only into the decoder's own buffers, whose contents the next step
        recomputes."""
        gpu = torch.cuda.get_device_name(self.x.device)
        groups: dict[tuple, list[MatVec]] = {}
        for mv in self.matvecs():
            groups.setdefault(mv.signature(), []).append(mv)
        report = {}
        for sig, mvs in groups.items():
            report.update(self.tune_matrix(gpu, sig, mvs))
        if self.options.tune_attention and not self.fixed_attention:
            report.update(self.tune_attention(gpu))
        if self.options.tune_in_step:
            report.update(self.tune_in_step(gpu, groups))
        self.tuned = True
        self.tune_report = report
        if report and self.options.tuning is None:  # the model's results (an A/B run's own stay in memory)
            self.tuning.save(tuning_file())
        return report

    def tune_matrix(self, gpu: str, sig: tuple, mvs: list[MatVec]) -> dict:
        """Pick the fastest block shape of the products `mvs` (every instance of one matrix shape), unless this
        GPU's shape `sig` was tuned before; return the report entry of a new pick."""
        key = (gpu, sig, bool(self.launch))
        tuned, ranked = self.tuning.best, self.tuning.ranked
        report = {}
        if key not in tuned:
            times, failed = {}, {}
            for c in mvs[0].candidates():
                try:
                    times[c] = graph_time_us(lambda c=c, mvs=mvs: [mv(c) for mv in mvs]) / len(mvs)
                except OutOfResources as e:  # e.g. shared memory: try the next shape
                    failed[str(c)] = str(e)[:200]
            if not times:
                raise RuntimeError(f"Triton decode: no block shape fits this GPU for {sig}: {failed}")
            ranked[key] = sorted(times, key=times.get)
            tuned[key] = ranked[key][0]
            report[str(sig)] = {"kind": "matrix", "signature": sig, "instances": len(mvs), "best": tuned[key],
                                "us": {str(c): t for c, t in times.items()}, "failed": failed}
        for mv in mvs:
            mv.config = tuned[key]
        return report

    def tune_attention(self, gpu: str) -> dict:
        """Pick attention's (slots per iteration, warps, splits) from ATTN_CONFIGS, timed as `tune` times
        the matrices (every layer back to back as a CUDA graph) at a cache filled halfway from the position
        to the cache's end, a guess at the mean fill of the tokens to come. That writes each layer's cache
        slot at the guessed fill, which a later step writes again before any step reads it."""
        heads = self.batch * self.model.cfg.n_head
        pos = self.pos.clone()
        fill = min(self.max_seq - 1, (int(pos.item()) + self.max_seq) // 2)
        key = (gpu, "attention", heads, self.max_seq, fill, self.model.cfg.head_dim, bool(self.launch))
        attns = [block[1] for block in self.layers]
        tuned = self.tuning.best
        if key not in tuned:
            times = {}
            self.pos.fill_(fill)
            for block, warps in ATTN_CONFIGS:
                c = (block, warps, attention_splits(self.max_seq, heads, block))
                self.attn_block, self.attn_warps, self.splits = c
                times[c] = graph_time_us(lambda: [self.attend(a) for a in attns]) / len(attns)
            self.pos.copy_(pos)
            tuned[key] = min(times, key=times.get)
            report = {"attention": {"kind": "attention", "signature": key[1:], "fill": fill, "best": tuned[key],
                                    "us": {str(c): t for c, t in times.items()}}}
        else:
            report = {}
        self.attn_block, self.attn_warps, self.splits = tuned[key]
        return report

    def tune_in_step(self, gpu: str, groups: dict[tuple, list[MatVec]]) -> dict:
        """Re-pick each matrix shape's block shape among its STEP_TUNE_TOP fastest alone, by timing the whole
        step with each (one shape at a time, the others as chosen so far). Alone, a kernel follows copies of
        itself; in a step it follows attention or another matrix, and with programmatic launch how much of its
        weight stream overlaps that kernel depends on its block shape (how much it loads before its wait)."""
        key = (gpu, "step", tuple(groups), self.attn_block, self.attn_warps, self.splits, bool(self.launch))
        tuned, ranked = self.tuning.best, self.tuning.ranked
        if key in tuned:
            for sig, mvs in groups.items():
                for mv in mvs:
                    mv.config = tuned[key][sig]
            return {}
        report = {}
        for sig, mvs in groups.items():
            top = ranked[(gpu, sig, bool(self.launch))][:STEP_TUNE_TOP]
            if len(top) < 2:
                continue
            times = {}
            for c in top:
                for mv in mvs:
                    mv.config = c
                times[c] = self._step_time_us()
            best = min(times, key=times.get)
            for mv in mvs:
                mv.config = best
            report[f"step {sig}"] = {"kind": "step", "signature": sig, "best": best,
                                     "us": {str(c): t for c, t in times.items()}}
        tuned[key] = {sig: mvs[0].config for sig, mvs in groups.items()}
        return report

    def _step_time_us(self, replays: int = 25) -> float:
        """Median device time of one whole step as a CUDA graph, every replay from the same token and position.
        Each replay writes the cache slot at the position, which the real step writes again before reading it."""
        with self._state_kept() as (token, pos, _):
            return graph_time_us(self.run_step, replays, rewind=lambda: (self.token.copy_(token), self.pos.copy_(pos)))

    @contextlib.contextmanager
    def _state_kept(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Steps run inside (warm-up, timing) leave the token, position, seen tokens and random-number state as
        they were: the first real step samples as it would have without them."""
        state = (self.token.clone(), self.pos.clone(), self.seen.clone())
        rng = torch.cuda.get_rng_state(self.x.device)
        try:
            yield state
        finally:
            for buf, saved in zip((self.token, self.pos, self.seen), state):
                buf.copy_(saved)
            torch.cuda.set_rng_state(rng, self.x.device)

    def step(self) -> None:
        if self.token.device.type != "cuda":
            self.run_step()
            return
        if self.graph is None:
            self.capture()
        self.graph.replay()

    def capture(self) -> None:
        """Tune, warm up (compiles the kernels), then record the step as a CUDA graph. The warm-up step runs on
        the real cache: it writes slot `pos` with what the real step writes there, and the state is restored."""
        with self._state_kept():
            if not self.tuned:
                self.tune()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.run_step()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records without running: the state is the warm-up's until restored
                self.run_step()


def graph_time_us(fn: Callable[[], object], replays: int = 5, rewind: Callable[[], object] | None = None) -> float:
    """Median device time of `fn` captured once as a CUDA graph (after one eager call that compiles). `rewind`,
    if given, runs before each replay, untimed: for an `fn` that advances the state it reads."""
    rewind = rewind or (lambda: None)
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    rewind()
    graph.replay()
    times = []
    for _ in range(replays):
        rewind()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)
