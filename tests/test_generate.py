"""Generation: batched left-padded prompts equal each prompt alone, greedy equals a naive argmax loop, seeds
reproduce, top-k / top-p limits, the repetition penalty, EOT, streaming, the context limits and the sliding
window past them, and the CPU thread choice."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from antimatter.config import SampleConfig, preset_model
from antimatter.model.decode import DecodeOptions, NormLinear, single_row_matmuls
from antimatter.model.generate import continue_ids, decode_threads, generate, kv_blocks, slide_window
from antimatter.model.gpt import GPT, RMSNorm


def make_model(preset: str = "tiny", seed: int = 0, **over) -> GPT:
    """Random weights with a large init, so greedy choices are decisive (no near-ties)."""
    cfg = dataclasses.replace(preset_model(preset), **{"init_std": 0.3, **over})
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def prompt(n: int, seed: int, vocab: int = 512) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n,), generator=g).tolist()


def naive_greedy(model: GPT, ids: list[int], n: int) -> list[int]:
    """No cache, no padding: the argmax of the full forward, one token at a time."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(ids):]


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_greedy_equals_naive_argmax_loop(preset):
    model = make_model(preset)
    p = prompt(7, seed=1)
    assert generate(model, [p], 20) == [naive_greedy(model, p, 20)]


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_batched_prompts_of_different_lengths_equal_each_alone(preset):
    model = make_model(preset)
    prompts = [prompt(n, seed=n) for n in (12, 3, 1, 8)]
    batched = generate(model, prompts, 16)
    alone = [generate(model, [p], 16)[0] for p in prompts]
    assert batched == alone
    assert all(len(row) == 16 for row in batched)
    assert len({tuple(r) for r in batched}) > 1  # the rows really differ


def test_same_seed_same_sample_different_seed_different():
    model = make_model(init_std=0.02)  # near-uniform next-token distributions: sampling varies a lot
    p = [prompt(5, seed=1), prompt(2, seed=2)]
    kw = dict(temperature=1.0, top_k=0, top_p=1.0)
    a = generate(model, p, 24, seed=7, **kw)
    assert generate(model, p, 24, seed=7, **kw) == a
    assert generate(model, p, 24, seed=8, **kw) != a
    assert a != generate(model, p, 24)  # and it is not greedy


def test_top_k_one_and_tiny_top_p_equal_greedy():
    model = make_model()
    p = [prompt(6, seed=3), prompt(4, seed=4)]
    greedy = generate(model, p, 20)
    assert generate(model, p, 20, temperature=1.5, top_k=1, seed=1) == greedy
    assert generate(model, p, 20, temperature=1.5, top_p=1e-6, seed=2) == greedy


def constant_logits_model(vocab: int = 512) -> tuple[GPT, list[int]]:
    """A model whose next-token logits are the same at every position, all positive and distinct: the final
    norm outputs a constant vector (gain 0, bias 1) and the untied head rows are positive. Returns the model and
    the token ids from the highest logit down."""
    model = make_model(tie_embeddings=False, vocab_size=vocab)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        head = torch.rand(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(0)) + 1.0
        model.lm_head.weight.copy_(head)
        logits = model(torch.tensor([[1, 2, 3]]))[0]
    assert torch.equal(logits[0], logits[-1]) and (logits > 0).all()
    return model, logits[-1].argsort(descending=True).tolist()


def test_repetition_penalty():
    model, order = constant_logits_model()
    p = [order[1], order[4], 17]
    # without a penalty the constant logits repeat the top token forever
    assert generate(model, [p], 12) == [[order[0]] * 12]
    # a huge penalty pushes every seen token (prompt included) below every unseen one: each new token is the
    # best not yet in the row, so nothing repeats
    out = generate(model, [p], 12, repetition_penalty=1e6)[0]
    assert out == [t for t in order if t not in p][:12]
    assert len(set(out)) == 12 and not set(out) & set(p)
    # a penalty of 1 is no penalty
    assert generate(model, [p], 12, repetition_penalty=1.0) == generate(model, [p], 12)


def test_padding_rows_of_the_head_are_never_generated():
    model, _ = constant_logits_model(vocab=300)  # head padded to 320 rows
    with torch.no_grad():
        model.lm_head.weight[300:] = 1e3
    out = generate(model, [[1, 2], [3]], 20, temperature=1.0, seed=0) + generate(model, [[1]], 20,
                                                                                    repetition_penalty=1e6)
    assert max(max(row) for row in out) < 300


def test_eot_stops_and_is_excluded():
    model = make_model()
    p = prompt(5, seed=5)
    free = generate(model, [p], 20)[0]
    k = next(i for i in range(2, 20) if free[i] not in free[:i])  # first position where a new token appears
    assert generate(model, [p], 20, eot_id=free[k]) == [free[:k]]
    assert generate(model, [p], 20, eot_id=free[0]) == [[]]
    # in a batch each row stops at its own EOT; the others go on
    q = prompt(9, seed=6)
    other = generate(model, [q], 20)[0]
    cut = other[: other.index(free[k])] if free[k] in other else other
    assert generate(model, [p, q], 20, eot_id=free[k]) == [free[:k], cut]


def test_on_token_streams_each_new_token_once():
    model = make_model()
    prompts = [prompt(5, seed=5), prompt(2, seed=9)]
    calls: list[tuple[int, list[int]]] = []
    out = generate(model, prompts, 10, on_token=lambda step, t: calls.append((step, t.tolist())))
    assert [s for s, _ in calls] == list(range(10))
    assert [[ids[i] for _, ids in calls] for i in range(2)] == out
    # with EOT, single row: streaming stops right after the EOT token (which the caller sees and skips)
    k = next(i for i in range(2, 10) if out[0][i] not in out[0][:i])
    calls.clear()
    res = generate(model, prompts[:1], 10, eot_id=out[0][k],
                   on_token=lambda step, t: calls.append((step, t.tolist())))
    assert res == [out[0][:k]]
    assert [ids[0] for _, ids in calls] == out[0][:k + 1]


def test_context_limits():
    model = make_model()  # block_size 64
    with pytest.raises(ValueError, match="max_new_tokens \\(64\\) must be smaller than the context \\(64\\)"):
        generate(model, [[1, 2]], 64)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], 4)
    assert generate(model, [[1, 2]], 0) == [[]]
    # a prompt longer than the context is cropped from the left, so prompt + new tokens fit
    long = prompt(100, seed=11)
    out = generate(model, [long], 10)
    assert out == generate(model, [long[-54:]], 10) == [naive_greedy(model, long[-54:], 10)]
    assert generate(model, [long, [5]], 10) == [out[0], generate(model, [[5]], 10)[0]]


def test_generate_leaves_no_cache_behind():
    model = make_model()
    generate(model, [[1, 2, 3]], 5)
    assert all(b.attn.kv_cache is None for b in model.transformer.h)
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 512)  # the plain forward works again


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_attention_over_the_filled_part_of_the_cache_only(preset):
    """Decoding reads only the first kv_len slots: junk in the slots beyond cannot change the logits, and
    kv_len=None (the whole cache) gives the same logits when those slots are masked anyway."""
    model = make_model(preset)
    model.setup_caches(2, 48)
    for block in model.transformer.h:  # slots never written hold junk, not zeros
        block.attn.kv_cache.k.normal_(0, 100)
        block.attn.kv_cache.v.normal_(0, 100)
    idx = torch.tensor([prompt(10, seed=3), prompt(10, seed=4)])
    left_pad = torch.tensor([0, 3])
    with torch.no_grad():
        model(idx, input_pos=torch.arange(10), left_pad=left_pad, kv_len=10)
        nxt = torch.tensor([[5], [6]])
        short = model(nxt, input_pos=torch.tensor([10]), left_pad=left_pad, kv_len=16)
        full = model(nxt, input_pos=torch.tensor([10]), left_pad=left_pad)
        for block in model.transformer.h:
            block.attn.kv_cache.k[:, :, 16:].normal_(0, 100)
        again = model(nxt, input_pos=torch.tensor([10]), left_pad=left_pad, kv_len=16)
    torch.testing.assert_close(short, full)
    assert torch.equal(short, again)
    model.clear_caches()


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_small_kv_blocks_change_nothing(preset):
    """With 4-slot blocks a 30-token generation crosses many block boundaries: the tokens still equal
    the naive loop, alone and batched with prompts of other lengths."""
    assert kv_blocks(5, 40, 4) == 8 and kv_blocks(40, 40, 4) == 40 and kv_blocks(39, 38, 4) == 38
    opts = DecodeOptions(kv_block=4)
    model = make_model(preset)
    prompts = [prompt(n, seed=n) for n in (9, 2, 5)]
    assert generate(model, prompts[:1], 30, options=opts) == [naive_greedy(model, prompts[0], 30)]
    assert generate(model, prompts, 30, options=opts) == [generate(model, [p], 30, options=opts)[0] for p in prompts]


def test_compiled_decode_equals_eager_across_kv_blocks():
    """The compiled path (inductor; CUDA graphs on a GPU) with 8-slot blocks: one compilation of the decode
    step serves every kv_len, and its tokens equal the eager ones, batched with padding too."""
    opts = DecodeOptions(kv_block=8)
    model = make_model()
    prompts = [prompt(5, seed=1), prompt(2, seed=2)]
    eager = generate(model, prompts, 30, options=opts)
    assert generate(model, prompts, 30, compile=True, options=opts) == eager
    assert generate(model, prompts, 30, compile=True, options=opts) == eager  # the cached compiled steps again
    # with the prefill compiled too (dynamic shapes): the same tokens
    with_prefill = DecodeOptions(kv_block=8, compile_prefill=True)
    assert generate(model, prompts, 30, compile=True, options=with_prefill) == eager


def test_compiled_decoding_leaves_the_prefill_eager_by_default():
    """A prompt is prefilled once: compiling it would cost every start a trace for a few milliseconds. Only
    the decode step is compiled unless DecodeOptions.compile_prefill."""
    from antimatter.model.generate import _compiled_steps, _step

    model = make_model()
    prefill, decode = _compiled_steps(model, DecodeOptions().compile_mode)
    assert prefill is _step and decode is not _step
    prefill, _ = _compiled_steps(model, "reduce-overhead", compile_prefill=True)
    assert prefill is not _step


def test_single_row_gemv_path_equals_the_matmul():
    """decode.single_row_matmuls: under torch.compile a single-row matmul is a multiply-and-sum reduction; the
    compiled batch-1 tokens equal the eager ones (where F.linear always runs), and the plain modules are back
    afterwards."""
    model = make_model()
    p = [prompt(6, seed=5)]
    eager = generate(model, p, 12)
    def modules() -> dict[str, torch.nn.Module]:  # less the KV caches that compiled generation keeps
        return {n: m for n, m in model.named_modules() if "kv_cache" not in n}

    plain = modules()
    with single_row_matmuls(model):
        x = torch.randn(1, 1, model.cfg.d_model)
        fc = model.transformer.h[0].mlp.c_fc
        assert isinstance(fc, NormLinear)
        torch.testing.assert_close(torch.compile(fc)(x), fc(x), rtol=1e-5, atol=1e-5)
    assert modules() == plain
    assert generate(model, p, 12, compile=True, gemv=True) == eager
    assert modules() == plain


@pytest.mark.parametrize("norm_kind", ["layernorm", "rmsnorm"])
def test_norm_folded_into_single_row_matmul(norm_kind):
    """On the compiled single-row path `NormLinear` folds the norm into the matmul's reduction (statistics
    summed per output row): the same numbers as norm then matmul, on inputs whose mean exceeds their spread
    (the variance is E[x^2] - mean^2 in float32 there), and one generated kernel fewer than with the norm as
    its own step."""
    from torch._inductor import metrics

    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(64) if norm_kind == "layernorm" else RMSNorm(64, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.uniform_(-0.5, 0.5)
    lin = torch.nn.Linear(64, 96)
    x = torch.randn(1, 1, 64) * 3 + 4.0
    with torch.no_grad():
        ref = lin(norm(x))
        kernels = {}
        for fold in (True, False):
            torch._dynamo.reset()
            metrics.reset()
            out = torch.compile(NormLinear(lin, norm, fold_norm=fold))(x)
            kernels[fold] = metrics.generated_kernel_count
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)
    torch._dynamo.reset()
    assert kernels[True] < kernels[False], kernels


def test_seed_reproduces_compiled_sampling():
    """A seed gives the same sample again in compiled mode too (its random stream is inductor's own, so it
    differs from eager's: docs/ARCHITECTURE.md)."""
    model = make_model()
    p = [prompt(5, seed=1)]
    kw = dict(temperature=0.8, top_k=20, seed=3, compile=True)
    first = generate(model, p, 10, **kw)
    assert generate(model, p, 10, **kw) == first
    assert generate(model, p, 10, **{**kw, "seed": 4}) != first


# ------------------------------------------------------------------------------------ on the CPU


def test_a_small_model_decodes_on_one_thread_and_torchs_setting_comes_back():
    """Auto (threads=0): one thread while a small model decodes a few rows, torch's own setting before and
    after; a number given is used as it is; a step too large for one thread keeps torch's setting."""
    model = make_model()
    seen: list[int] = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = generate(model, [[1, 2, 3]], 6, on_token=lambda step, t: seen.append(torch.get_num_threads()))
        assert seen == [1] * 6 and torch.get_num_threads() == 2
        seen.clear()
        assert generate(model, [[1, 2, 3]], 6, threads=2, on_token=lambda s, t: seen.append(torch.get_num_threads())
                        ) == out
        assert seen == [2] * 6 and torch.get_num_threads() == 2
        assert decode_threads(model, 1) == 1
        assert decode_threads(model, rows=10**6) == 2  # rows x parameters past SMALL_STEP: torch's setting
        assert decode_threads(model, 1, threads=3) == 3
    finally:
        torch.set_num_threads(before)


def test_eager_decoding_does_not_import_dynamo():
    """torch._dynamo takes 1.5 s to import: a plain (eager) call must not wait for it before its first token."""
    import subprocess
    import sys

    code = ("import sys, torch; from antimatter.config import preset_model; from antimatter.model.gpt import GPT; "
            "from antimatter.model.generate import generate; "
            "generate(GPT(preset_model('tiny')).eval(), [[1, 2, 3]], 4, temperature=0.8, seed=0); "
            "print('torch._dynamo' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


# ------------------------------------------------------------------------------------ past the context


def naive_sliding_greedy(model: GPT, ids: list[int], n: int) -> list[int]:
    """The sliding window written out without a cache: each round starts from the last `slide_window`
    tokens (the first from the prompt's) and feeds its own new tokens until it holds a context's worth."""
    ctx, keep, out = model.cfg.block_size, slide_window(model.cfg.block_size), []
    while len(out) < n:
        window = (ids + out)[-keep:]
        for _ in range(min(n - len(out), ctx - keep)):
            out.append(naive_greedy(model, window, 1)[0])
            window.append(out[-1])
    return out


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_past_the_context_the_window_slides(preset):
    """max_new_tokens at or past the context (64): every token asked for, each predicted from the sliding
    window, streamed once with steps numbered across the rounds."""
    model = make_model(preset)
    s = SampleConfig(max_new_tokens=150, temperature=0.0)
    p = prompt(40, seed=3)
    steps: list[int] = []
    out = continue_ids(model, [p], s, eot_id=-1, on_token=lambda step, t: steps.append(step))[0]
    assert len(out) == 150 and steps == list(range(150))
    assert out == naive_sliding_greedy(model, p, 150)
    # below the context nothing changes: one call, the prompt cropped from the left
    assert continue_ids(model, [p], SampleConfig(max_new_tokens=30, temperature=0.0), eot_id=-1) == \
        generate(model, [p], 30)


def test_sliding_rows_end_at_their_own_eot():
    """In a batch past the context, a row that ends (EOT) in a later round stops there; the others go on,
    each equal to its own run alone, and the stream shows EOT for the ended row."""
    model = make_model()
    s = SampleConfig(max_new_tokens=120, temperature=0.0)
    prompts = [prompt(5, seed=5), prompt(9, seed=6)]
    free = continue_ids(model, prompts, s, eot_id=-1)
    # a token that first appears in row 0 after the first round (32 tokens) and never in row 1's output
    k = next(i for i in range(40, 120) if free[0][i] not in free[0][:i] and free[0][i] not in free[1])
    eot = free[0][k]
    streamed: list[list[int]] = []
    both = continue_ids(model, prompts, s, eot_id=eot, on_token=lambda step, t: streamed.append(t.tolist()))
    assert both == [free[0][:k], free[1]] == [continue_ids(model, [p], s, eot_id=eot)[0] for p in prompts]
    # row 0's stream: its tokens, its EOT; rounds after the one it ended in show it EOT (within that round the
    # row runs on with its batch, as in any `generate` call: a reader stops at a row's EOT)
    row0, next_round = [row[0] for row in streamed], (k // 32 + 1) * 32
    assert len(streamed) == 120 and row0[: k + 1] == free[0][:k] + [eot]
    assert row0[next_round:] == [eot] * (120 - next_round)
