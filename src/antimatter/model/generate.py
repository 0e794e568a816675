"""Generation: static KV cache, prefill then one token at a time, sampling on the device. The library that
`antimatter generate`, the Python API (llm.py) and eval call: `generate` over token ids, and
`continue_texts` over text with a config's sampling settings.

Batched prompts of different lengths are left-padded; the model masks the padding slots and shifts each
row's positions, so a row's output does not depend on what it is batched with. Sampling (temperature, top-k,
top-p, repetition penalty) runs on the device with the exponential-race trick (argmax of p / Exp(1) samples
from p) so no host sync is needed per token; only streaming (`on_token`) and the EOT check read back.

With `compile=True` the single-token step is compiled with CUDA graphs (`mode="reduce-overhead"`), which
removes the kernel-launch overhead that otherwise dominates batch-1 decoding of small models; the prefill,
which runs once a prompt, stays eager unless `DecodeOptions.compile_prefill` (compiling it costs seconds at
every start and saves milliseconds). Attention reads only the filled part of the cache (whole blocks of
`kv_block` slots; one compilation serves every length), and
at batch 1 the matmuls run as inductor reductions (`decode.single_row_matmuls`), faster than cuBLAS at one row. With
`kernels=True` (the default for compiled decoding on a GPU up to KERNELS_MAX_BATCH rows, when Triton is there)
the step runs instead as AntiMatter's own Triton kernels, five a layer, replayed as one CUDA graph
(`model/triton_decoder.py`, kernels in `model/decode_kernels.py`).

On the CPU a small model decodes on one thread (`decode_threads`): a step of a few rows is too little work
to split. `continue_ids` / `continue_texts` go past the context by sliding a window over the text.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from antimatter.compile_cache import use_compile_cache
from antimatter.config import SampleConfig
from antimatter.model.decode import KV_BLOCK, DecodeOptions, single_row_matmuls
from antimatter.model.gpt import GPT


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty: divide positive / multiply negative logits of tokens already in the row."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(B, V) float logits -> (B,) token ids. temperature 0 means greedy."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) > top_p  # keep the first token that crosses top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1.0)
    return (probs / race).argmax(dim=-1)


def check_sampling(temperature: float, top_k: int, top_p: float, repetition_penalty: float,
                   seed: int | None) -> None:
    """Refuse sampling settings that would give nonsense without a word: nan logits pick token 0 (often the
    end of text: no tokens at all), a zero penalty divides by zero, a negative top-k fails inside topk."""
    if not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if not 0.0 < repetition_penalty < math.inf:
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got {repetition_penalty}")
    if seed is not None and not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")


def kv_blocks(filled: int, max_seq: int, block: int = KV_BLOCK) -> int:
    """Cache slots the attention of a step reads: `filled` rounded up to whole blocks. Few distinct values,
    so the compiled decode step is captured as a CUDA graph once per block count and then replayed."""
    return min(max_seq, -(-filled // block) * block)


def compiled_cache_slots(needed: int, ctx: int) -> int:
    """The KV cache size of compiled decoding: `needed` slots rounded up to a multiple of 256 (at most the
    context), so few distinct sizes occur and each decode graph is captured once and replayed."""
    return min(ctx, -(-needed // 256) * 256)


def _step(model: GPT, tokens: torch.Tensor, input_pos: torch.Tensor, left_pad: torch.Tensor,
          seen: torch.Tensor, kv_slots: torch.Tensor, temperature: float, top_k: int, top_p: float,
          penalty: float):
    """One forward over `tokens` (B, T) at cache slots `input_pos`, attending over the first
    len(kv_slots) cache slots, then sample the next token per row. The length travels as a tensor's shape
    (marked dynamic) so that one compilation serves every length while all other shapes stay static."""
    kv_len = kv_slots.shape[0]
    logits = model(tokens, input_pos=input_pos, left_pad=left_pad, kv_len=kv_len)[:, -1].float()
    logits = apply_repetition_penalty(logits, seen, penalty)
    nxt = sample_next(logits, temperature, top_k, top_p)
    seen = seen.scatter(1, nxt[:, None], True)
    return nxt, seen


def _compiled_steps(model: GPT, mode: str, coordinate_descent: bool = False, compile_prefill: bool = False):
    """(prefill, decode) steps for a torch.compile mode, cached on the model so repeated calls reuse the
    graphs. The decode step replays as a CUDA graph, one per distinct kv_len. The prefill is compiled (with
    dynamic shapes) only with `compile_prefill`: it runs once a prompt, and tracing it costs every start."""
    cache = model.__dict__.setdefault("_antimatter_compiled_steps", {})
    key = (mode, coordinate_descent, compile_prefill)
    if key not in cache:
        use_compile_cache()  # a second start reuses what the first compiled
        # imported here: loading inductor is slow, and eager generation never needs it
        from torch._inductor import list_mode_options

        options = dict(list_mode_options(mode))
        if coordinate_descent:
            options["coordinate_descent_tuning"] = True
        cache[key] = (torch.compile(_step, dynamic=True) if compile_prefill else _step,
                      torch.compile(_step, fullgraph=True, options=options))
    return cache[key]


KERNELS_MAX_BATCH = 64  # ... up to this many rows (one tile of rows in its matmuls)


def _triton_decoder(model: GPT, kernels: bool | None, compile: bool | str, batch: int, args: tuple,
                    options: DecodeOptions):
    """The Triton decoder for this call, or None for the torch path. `kernels=True` insists (and says why it
    cannot), None decides: compiled, on a GPU, at most KERNELS_MAX_BATCH rows, Triton importable, the model
    supported (and `options.auto_kernels`). `args`: the sampling settings (temperature, top_k, top_p,
    repetition penalty); greedy without a penalty, the decoder picks the argmax in a kernel."""
    on_gpu = model.lm_head.weight.is_cuda  # the interpreter (CPU) runs them only when asked: kernels=True
    auto = compile and options.auto_kernels and on_gpu and batch <= KERNELS_MAX_BATCH
    if kernels is False or (kernels is None and not auto):
        return None
    try:  # here, not at the top: Triton is optional (CPU installs of torch lack it)
        import antimatter.model.triton_decoder as triton_decoder
    except ImportError:
        if kernels:
            raise ValueError("kernels=True needs Triton: pip install triton (CUDA builds of torch bring it)") from None
        return None
    reason = triton_decoder.unsupported_reason(model)
    if reason:
        if kernels:
            raise ValueError(f"kernels=True: {reason}")
        return None
    temperature, top_k, top_p, penalty = args

    def sample(logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        return sample_next(apply_repetition_penalty(logits, seen, penalty), temperature, top_k, top_p)

    kv_buf = model.transformer.h[0].attn.kv_cache.kv
    key = (kv_buf.data_ptr(), kv_buf.shape, *args, options, id(options.tuning))
    cached = model.__dict__.get("_antimatter_triton_decoder")
    if cached is None or cached[0] != key:  # new cache buffers, sampling settings or options: a new graph
        greedy = temperature <= 0.0 and penalty == 1.0
        cached = (key, triton_decoder.TritonDecoder(model, sample, greedy=greedy, options=options))
        model.__dict__["_antimatter_triton_decoder"] = cached
    cached[1].refresh()
    return cached[1]


def _slots(n: int, device: torch.device, table: dict[int, torch.Tensor], compiled: bool) -> torch.Tensor:
    """arange(n) on the device, made once per length (no host-to-device copy per token); marked dynamic for
    compiled steps only, since importing torch._dynamo costs an eager call 1.5 s before its first token."""
    if n not in table:
        table[n] = torch.arange(n, device=device)
        if compiled:
            torch._dynamo.maybe_mark_dynamic(table[n], 0)
    return table[n]


def _left_padded(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) token ids with each prompt right-aligned, and each row's number of padding slots."""
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
    return idx.to(device), torch.tensor([T - len(p) for p in prompts], device=device)


def _seen_tokens(idx: torch.Tensor, prompts: list[list[int]], vocab_size: int, pad_id: int,
                 penalty: float) -> torch.Tensor:
    """(B, V) mask of the tokens each row holds, for the repetition penalty (padding is not a prompt token)."""
    seen = torch.zeros(idx.shape[0], vocab_size, dtype=torch.bool, device=idx.device)
    if penalty != 1.0:
        seen.scatter_(1, idx, True)
        seen[:, pad_id] = seen[:, pad_id] & torch.tensor([pad_id in p for p in prompts], device=idx.device)
    return seen


def _decode(model: GPT, steps: tuple, decoder, idx: torch.Tensor, left_pad: torch.Tensor, seen: torch.Tensor,
            max_new_tokens: int, max_seq: int, args: tuple, eot_id: int | None, on_token, kv_block: int,
            compiled: bool) -> list[torch.Tensor]:
    """Prefill, then one token a step (the Triton decoder's graph, else the `steps` pair's decode step) until
    `max_new_tokens` or every row has ended; returns the new (B,) token tensors in order."""
    prefill, decode = steps
    (B, T), device = idx.shape, idx.device
    slots: dict[int, torch.Tensor] = {}
    prompt_slots = _slots(T, device, slots, compiled)  # the prompt's cache slots, and the length attention reads
    nxt, seen = prefill(model, idx, prompt_slots, left_pad, seen, prompt_slots, *args)
    out = [nxt]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    if on_token is not None:
        on_token(0, nxt)
    pos = torch.tensor([T], device=device)  # advanced on the device: no host-to-device copy per token
    if decoder is not None:
        decoder.start(nxt, T, seen, left_pad)
    for step in range(1, max_new_tokens):
        if eot_id is not None:
            done = done | (nxt == eot_id)
            if (on_token is not None or step % 16 == 0) and bool(done.all()):
                break
        if decoder is not None:
            decoder.step()
            nxt = decoder.token.clone()  # the graph overwrites its token on the next replay
        else:
            kv = _slots(kv_blocks(T + step, max_seq, kv_block), device, slots, compiled)
            nxt, seen = decode(model, nxt.view(B, 1), pos, left_pad, seen, kv, *args)
            nxt, seen = nxt.clone(), seen.clone()  # graph outputs are overwritten by the next replay
            pos += 1
        out.append(nxt)
        if on_token is not None:
            on_token(step, nxt)
    return out


# A decode step of at most this many rows x parameters runs faster on one CPU thread than on several: the
# work is too little to split, and threads wait on each other, most of all on a machine others are using
# (docs/RESULTS.md, "Threads" under decode speed on 2 CPU cores).
SMALL_STEP = 1 << 25


def decode_threads(model: GPT, rows: int, threads: int = 0) -> int:
    """The CPU threads to decode `rows` rows with: `threads` when given, else one for a small step (rows x
    parameters up to SMALL_STEP: the quickstart model up to about 16 rows), else torch's current setting.
    Off the CPU, torch's setting (it is not used)."""
    if threads:
        return threads
    on_cpu = model.lm_head.weight.device.type == "cpu"
    if on_cpu and rows * sum(p.numel() for p in model.parameters()) <= SMALL_STEP:
        return 1
    return torch.get_num_threads()


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to `n` for the block, and put back after it."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)


@torch.inference_mode()
def generate(model: GPT, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, eot_id: int | None = None,
             seed: int | None = None, on_token: Callable[[int, torch.Tensor], None] | None = None,
             compile: bool | str = False, pad_id: int = 0, gemv: bool | None = None,
             kernels: bool | None = None, options: DecodeOptions | None = None, threads: int = 0
             ) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens; returns only the new tokens of each row, cut
    before the first EOT. `on_token(step, tokens)` is called with each new (B,) tensor, for streaming.
    `compile`: True compiles prefill and the decode step (`options.compile_mode`); a string names the
    torch.compile mode of the decode step. `gemv` (compiled only): single-row matmuls as reductions;
    None = at batch 1. `kernels`: decode steps as AntiMatter's Triton kernels in one CUDA graph (True:
    required; None: when compiled on a GPU, the batch at most KERNELS_MAX_BATCH and the model supported;
    False: never). `options`: the switches of compiled decoding (None: `DecodeOptions()`, the defaults).
    `threads`: CPU threads while decoding (0: `decode_threads` decides; torch's setting is restored after)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    check_sampling(temperature, top_k, top_p, repetition_penalty, seed)
    options = options or DecodeOptions()
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    ctx = model.cfg.block_size
    if max_new_tokens >= ctx:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be smaller than the context ({ctx})")
    keep = ctx - max_new_tokens  # crop long prompts from the left so prompt + output fits the context
    prompts = [p[-keep:] for p in prompts]
    idx, left_pad = _left_padded(prompts, pad_id, model.lm_head.weight.device)
    seen = _seen_tokens(idx, prompts, model.cfg.vocab_size, pad_id, repetition_penalty)
    if seed is not None:
        torch.manual_seed(seed)
    (B, T), args = idx.shape, (temperature, top_k, top_p, repetition_penalty)
    max_seq = compiled_cache_slots(T + max_new_tokens, ctx) if compile else T + max_new_tokens
    cache = model.transformer.h[0].attn.kv_cache
    if cache is None or cache.k.shape[0] != B or cache.k.shape[2] != max_seq:
        model.setup_caches(B, max_seq)
    mode = compile if isinstance(compile, str) else options.compile_mode
    steps = _compiled_steps(model, mode, options.coordinate_descent, options.compile_prefill) if compile \
        else (_step, _step)
    # a single new token comes from the prefill alone
    decoder = _triton_decoder(model, kernels, compile, B, args, options) if max_new_tokens > 1 else None
    # compiled at batch 1: matmuls as reductions (faster than cuBLAS at one row), swapped in after the Triton
    # decoder has read the plain modules
    single_row = bool(compile) and (B == 1 if gemv is None else gemv)
    swap = single_row_matmuls(model, options.fold_norm) if single_row else contextlib.nullcontext()
    try:
        with swap, torch_threads(decode_threads(model, B, threads)):
            out = _decode(model, steps, decoder, idx, left_pad, seen, max_new_tokens, max_seq, args, eot_id,
                          on_token, options.kv_block, bool(compile))
    finally:
        if not compile:  # compiled graphs hold the cache buffers: keep them for the next call
            model.clear_caches()
    tokens = torch.stack(out, dim=1).tolist()
    if eot_id is not None:
        tokens = [row[: row.index(eot_id)] if eot_id in row else row for row in tokens]
    return tokens


def slide_window(ctx: int) -> int:
    """Tokens a sliding window keeps when generation runs past the context: half of it, so each re-read of
    the window (a prefill) is followed by as many new tokens."""
    return max(1, ctx // 2)


def continue_ids(model: GPT, prompts: list[list[int]], s: SampleConfig, eot_id: int, *,
                 on_token: Callable[[int, torch.Tensor], None] | None = None, compile: bool | str = False,
                 threads: int = 0) -> list[list[int]]:
    """Continue each prompt by `s.max_new_tokens` tokens with `s`'s sampling settings (cut before EOT).
    Below the context that is one `generate` call (long prompts cropped from the left to make room). At or
    past it the window slides: each round reads the last `slide_window(ctx)` tokens of the text so far (the
    first round: of the prompt) and adds `ctx - slide_window(ctx)` tokens, the same in every row whatever its
    length (so a row's output does not depend on its batch), until every row has its tokens or its EOT.
    `on_token` numbers steps across rounds and sees EOT for the rows that already ended."""
    ctx = model.cfg.block_size
    kw = dict(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, repetition_penalty=s.repetition_penalty,
              eot_id=eot_id, compile=compile, threads=threads)
    if s.max_new_tokens < ctx:
        return generate(model, prompts, s.max_new_tokens, seed=s.seed, on_token=on_token, **kw)
    keep = slide_window(ctx)
    out: list[list[int]] = [[] for _ in prompts]
    active, seed, done = list(range(len(prompts))), s.seed, 0
    while active:
        windows = [(prompts[i] + out[i])[-keep:] for i in active]
        n = min(s.max_new_tokens - done, ctx - keep)
        if n <= 0:  # a context of one token: nothing fits after the window
            break
        new = generate(model, windows, n, seed=seed, on_token=_spread(on_token, active, len(prompts), done, eot_id),
                       **kw)
        seed, done = None, done + n  # later rounds go on drawing from the same seeded stream
        for i, row in zip(active, new):
            out[i] += row
        active = [i for i, row in zip(active, new) if len(row) == n and done < s.max_new_tokens]
    return out


def _spread(on_token, active: list[int], rows: int, offset: int, eot_id: int):
    """`on_token` for a round of some rows: step numbers go on from `offset`, rows that ended read EOT."""
    if on_token is None:
        return None
    if len(active) == rows:
        return lambda step, t: on_token(offset + step, t)

    def call(step: int, t: torch.Tensor) -> None:
        full = torch.full((rows,), eot_id, dtype=t.dtype, device=t.device)
        full[active] = t
        on_token(offset + step, full)

    return call


def continue_texts(model: GPT, tokenizer, texts: list[str], s: SampleConfig, *,
                   on_token: Callable[[int, torch.Tensor], None] | None = None,
                   compile: bool | str = False, threads: int = 0) -> list[list[int]]:
    """Continue each text with the sampling settings of a config's `generate:` or `eval.sample:` section;
    returns the new token ids of each (cut before EOT). An empty text starts a new document (EOT alone)."""
    if not texts:
        return []
    prompts = [tokenizer.encode(t) or [tokenizer.eot_id] for t in texts]
    return continue_ids(model, prompts, s, tokenizer.eot_id, on_token=on_token, compile=compile, threads=threads)
