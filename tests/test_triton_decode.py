"""The Triton decode kernels (model/decode_kernels.py) and their decoder (model/triton_decoder.py) against the
model's own forward. Without a GPU they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before Triton is imported)."""

from __future__ import annotations

import copy
import dataclasses
import sys

import pytest
import torch

from antimatter.config import preset_model
from antimatter.model.decode import DecodeOptions, DecodeTuning
from antimatter.model.generate import generate
from antimatter.model.gpt import GPT

pytest.importorskip("triton")
from antimatter.model.decode_kernels import (  # noqa: E402
    ATTN_CONFIGS,
    MAX_SPLITS,
    attention_splits,
    greedy_kernel,
)
from antimatter.model.triton_decoder import TritonDecoder, unsupported_reason  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_model(preset: str, **over) -> GPT:
    """Random weights with a large init (decisive greedy choices) and perturbed norm gains and biases, so a
    misplaced norm weight or bias term changes the numbers."""
    cfg = dataclasses.replace(preset_model(preset), **{"init_std": 0.3, **over})
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model.to(DEVICE).eval()


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(1, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
@pytest.mark.parametrize("splits", [1, 4])
def test_one_step_equals_the_model_forward(preset, splits):
    """One kernel step after a 12-token prefill: logits equal a plain forward over all 13 tokens, and cache
    slot 12 holds the key and value the model's own cached forward writes there. Attention blocks of 4 slots,
    so the 12 cached slots span several blocks per split (and some splits get none); the combine kernel
    merges the splits."""
    model = make_model(preset)
    ids = torch.tensor([prompt(13, seed=1)], device=DEVICE)
    model.setup_caches(1, 32)
    with torch.no_grad():
        model(ids[:, :12], input_pos=torch.arange(12, device=DEVICE))
        dec = TritonDecoder(model, sample=lambda logits, seen: logits.argmax(-1), attn_splits=splits, attn_block=4)
        dec.refresh()
        dec.start(ids[0, 12], 12, torch.zeros_like(dec.seen))
        dec.run_step()
        ours = dec.logits[0, : model.cfg.vocab_size].clone()
        kv_ours = [b.attn.kv_cache.kv[:, :, :, 12].clone() for b in model.transformer.h]
        model(ids[:, 12:], input_pos=torch.tensor([12], device=DEVICE))  # the model writes slot 12 itself
        kv_ref = [b.attn.kv_cache.kv[:, :, :, 12] for b in model.transformer.h]
        model.clear_caches()
        ref = model(ids)[0, -1].float()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(kv_ours, kv_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert dec.token.item() == ref.argmax().item() and dec.pos.item() == 13
    assert dec.seen[0, dec.token.item()]


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_generate_with_kernels_equals_the_torch_path(preset):
    """Greedy: the same tokens as generate's torch path. Sampling with a seed, a top-k and a repetition
    penalty: the same tokens too where both draw from one random stream (eager, on the CPU); on a GPU the
    CUDA graph draws its own stream (as compiled decoding does), so there the seed must reproduce. Tokens
    are streamed once each."""
    model = make_model(preset)
    p = [prompt(7, seed=2)]
    assert generate(model, p, 6, kernels=True) == generate(model, p, 6, kernels=False)
    kw = dict(temperature=1.0, top_k=50, repetition_penalty=1.3, seed=5)
    streamed = []
    sampled = generate(model, p, 6, kernels=True, on_token=lambda i, t: streamed.append(int(t[0])), **kw)
    assert streamed == sampled[0]
    if DEVICE == "cpu":
        assert sampled == generate(model, p, 6, kernels=False, **kw)
    else:
        assert sampled == generate(model, p, 6, kernels=True, **kw)


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
@pytest.mark.parametrize("splits,split_k", [(1, 1), (4, 1), (1, 3)])
def test_batched_step_with_left_padding_equals_the_model(preset, splits, split_k):
    """Three prompts of 12, 9 and 5 tokens, left-padded as `generate` lays them out: one kernel step gives
    each row the logits and the cache slot of the model's own cached step (which masks the padding and
    shifts each row's positions). Attention blocks of 4 slots, so some blocks are all padding. With split-K
    the matmuls cut K (32 and 128) into 3 pieces of whole 16-wide tiles: uneven pieces, an empty one for
    K = 32, and every arrival count back at zero after the step."""
    model = make_model(preset)
    lengths, T = [12, 9, 5], 12
    ids = torch.zeros(3, T + 1, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = torch.tensor(prompt(n + 1, seed=10 + i))
    ids = ids.to(DEVICE)
    left_pad = torch.tensor([T - n for n in lengths], device=DEVICE)
    model.setup_caches(3, 32)
    with torch.no_grad():
        model(ids[:, :T], input_pos=torch.arange(T, device=DEVICE), left_pad=left_pad)
        dec = TritonDecoder(model, sample=None, attn_splits=splits, attn_block=4, greedy=True)  # argmax in a kernel
        for mv in dec.matvecs():
            mv.config = (16, 16, 4, 2, split_k)
        dec.refresh()
        dec.start(ids[:, T], T, torch.zeros_like(dec.seen), left_pad)
        dec.run_step()
        ours = dec.logits[:, : model.cfg.vocab_size].clone()
        kv_ours = [b.attn.kv_cache.kv[:, :, :, T].clone() for b in model.transformer.h]
        ref = model(ids[:, T:], input_pos=torch.tensor([T], device=DEVICE), left_pad=left_pad)[:, -1].float()
        kv_ref = [b.attn.kv_cache.kv[:, :, :, T] for b in model.transformer.h]
        model.clear_caches()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(kv_ours, kv_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert dec.token.tolist() == ref.argmax(-1).tolist() and dec.pos.item() == T + 1
    assert dec.seen.sum().item() == 3 and dec.seen[torch.arange(3), dec.token].all()
    assert dec.scratch.count.numel() == (0 if split_k == 1 else 32) and not dec.scratch.count.any()


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_batched_generate_with_kernels_equals_one_prompt_at_a_time(preset):
    """Prompts of different lengths in one batch through the kernels: each row's greedy tokens are the ones
    that prompt gets alone (its padding changes nothing), and the torch path's."""
    model = make_model(preset)
    prompts = [prompt(7, seed=2), prompt(3, seed=3), prompt(5, seed=4)]
    batched = generate(model, prompts, 6, kernels=True)
    assert batched == [generate(model, [p], 6, kernels=True)[0] for p in prompts]
    assert batched == generate(model, prompts, 6, kernels=False)


@pytest.mark.skipif(DEVICE == "cpu", reason="Triton 3.9's interpreter multiplies bf16 tiles wrongly; the fp32 "
                    "tests above cover the same code on the CPU")
@pytest.mark.parametrize("batch", [1, 3])
def test_bf16_step_is_as_accurate_as_the_models_own(batch):
    """In bf16 the kernels round differently from the model (the batched products split the normalised input
    into two bf16 parts): measured against the same weights in fp32, the kernels' logits must be no further
    off than the model's own bf16 step."""
    ref_model = make_model("tiny")
    model = make_model("tiny").to(torch.bfloat16)
    T = 10
    ids = torch.tensor([prompt(T + 1, seed=20 + i) for i in range(batch)], device=DEVICE)
    left_pad = torch.tensor([min(i * 3, T - 1) for i in range(batch)], device=DEVICE)
    with torch.no_grad():
        logits = []
        for m in (ref_model, model):
            m.setup_caches(batch, 32)
            m(ids[:, :T], input_pos=torch.arange(T, device=DEVICE), left_pad=left_pad)
            if m is model:
                dec = TritonDecoder(model, sample=lambda logits, seen: logits.argmax(-1))
                dec.refresh()
                dec.start(ids[:, T], T, torch.zeros_like(dec.seen), left_pad)
                dec.run_step()
                ours = dec.logits[:, : model.cfg.vocab_size].clone()
            logits.append(m(ids[:, T:], input_pos=torch.tensor([T], device=DEVICE), left_pad=left_pad)[:, -1].float())
    ref, own = logits
    assert (ours - ref).abs().max() <= 2 * (own - ref).abs().max() + 1e-3


@pytest.mark.skipif(DEVICE == "cpu", reason="tuning times CUDA graphs; the interpreter runs steps untimed")
def test_tuning_in_whole_steps_changes_no_token():
    """The in-step pass replays whole steps (each writes the cache slot at the position and advances it):
    generation afterwards gives the torch path's tokens, at batch 1 and for a batch of three, and the pass
    timed more than one block shape of some matrix."""
    opts = DecodeOptions(tune_in_step=True, tuning=DecodeTuning())  # tunes from scratch, whatever ran before
    model = make_model("tiny")
    reports = []
    for prompts in ([prompt(7, seed=2)], [prompt(7, seed=2), prompt(3, seed=3), prompt(5, seed=4)]):
        assert generate(model, prompts, 6, kernels=True, options=opts) == generate(model, prompts, 6, kernels=False)
        reports.append(model.__dict__["_antimatter_triton_decoder"][1].tune_report)
    batch_1 = reports[0]  # K = 32: two single-row block shapes fit each matrix (the batched ones, one)
    assert any(v["kind"] == "step" and len(v["us"]) == 2 for v in batch_1.values()), batch_1
    assert {v["kind"] for v in batch_1.values()} == {"matrix", "attention", "step"}  # what profile_kernels.py sorts


def test_tuning_results_belong_to_the_model_or_the_caller():
    """Options without a DecodeTuning: a model's decoders share the model's tuning results (a later call
    times no candidate again), another model's decoders have their own; one passed in the options is used."""
    model, other = make_model("tiny"), make_model("tiny")
    for m in (model, other):
        m.setup_caches(1, 16)
    first, again, elsewhere = (TritonDecoder(m, sample=None, greedy=True) for m in (model, model, other))
    assert first.tuning is again.tuning and first.tuning is not elsewhere.tuning
    mine = DecodeTuning()
    assert TritonDecoder(model, sample=None, greedy=True, options=DecodeOptions(tuning=mine)).tuning is mine
    assert DecodeOptions().tuning is None


def test_unsupported_models_say_why():
    odd = make_model("tiny", d_model=48, n_head=2)  # head_dim 24
    assert "power of two" in unsupported_reason(odd)
    with pytest.raises(ValueError, match="power of two"):
        generate(odd, [prompt(3, 1)], 4, kernels=True)
    assert generate(odd, [prompt(3, 1)], 4, kernels=None) == generate(odd, [prompt(3, 1)], 4)  # falls back



def test_weights_changed_in_place_are_seen_after_refresh():
    """The norm folds (W@g, W@b) are cached between calls and recomputed when a weight changed in place, as
    an optimizer step changes it: after `refresh` the same decoder computes with the new weights."""
    model = make_model("tiny")
    ids = torch.tensor([prompt(6, seed=3)], device=DEVICE)
    model.setup_caches(1, 16)
    dec = TritonDecoder(model, sample=lambda logits, seen: logits.argmax(-1))

    def step_logits() -> torch.Tensor:
        model(ids[:, :5], input_pos=torch.arange(5, device=DEVICE))
        dec.refresh()
        dec.start(ids[0, 5], 5, torch.zeros_like(dec.seen))
        dec.run_step()
        return dec.logits[0, : model.cfg.vocab_size].clone()

    with torch.no_grad():
        before = step_logits()
        for block in model.transformer.h:
            block.ln_1.weight.mul_(-1.5)
            block.ln_2.bias.add_(1.0)
        after = step_logits()
        model.clear_caches()
        ref = model(ids)[0, -1].float()
    torch.testing.assert_close(after, ref, rtol=1e-4, atol=1e-4)
    assert (after - before).abs().max() > 0.1


def test_weights_made_under_inference_mode_decode_like_the_torch_path():
    """A model copied under torch.inference_mode (as the speed evaluation makes its bf16 copy) has inference
    tensors, which keep no version counter: the kernels still decode, and the same tokens as the torch path;
    weights changed in place inside inference mode are seen too."""
    with torch.inference_mode():
        model = copy.deepcopy(make_model("tiny"))
    p = [prompt(7, seed=2)]
    assert generate(model, p, 6, kernels=True) == generate(model, p, 6, kernels=False)
    with torch.inference_mode():
        for block in model.transformer.h:
            block.ln_1.weight.mul_(-1.5)
    assert generate(model, p, 6, kernels=True) == generate(model, p, 6, kernels=False)


@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU compiled batch-1 decoding takes the kernels by default")
def test_the_interpreter_runs_only_when_asked():
    """On the CPU `kernels=None` keeps compiled decoding on the torch.compile step (the interpreter is for
    tests), so the compiled tests of that step still test it."""
    model = make_model("tiny")
    generate(model, [prompt(4, seed=1)], 3, compile=True)
    assert "_antimatter_triton_decoder" not in model.__dict__


def test_kernels_without_triton_say_how_to_get_it(monkeypatch):
    """kernels=True with Triton not importable: an error that names the fix; kernels=None falls back."""
    model = make_model("tiny")
    monkeypatch.setitem(sys.modules, "antimatter.model.triton_decoder", None)  # import now raises ImportError
    with pytest.raises(ValueError, match="pip install triton"):
        generate(model, [prompt(3, 1)], 4, kernels=True)
    assert generate(model, [prompt(3, 1)], 4, kernels=None) == generate(model, [prompt(3, 1)], 4, kernels=False)


def test_greedy_kernel_picks_the_first_of_equal_maxima_as_torch_argmax():
    """Equal top logits in two blocks of the kernel's loop, and twice inside one block: the first index wins,
    as torch.argmax picks; the token is marked seen and the position advances once for all rows."""
    V = 10_000
    logits = torch.randn(3, V + 6, device=DEVICE)  # rows padded past the vocabulary, as the head writes them
    logits[0, [5000, 9000]] = 7.0  # blocks 1 and 2 of 4,096
    logits[1, [100, 200]] = 7.0  # one block
    logits[2, V + 2] = 99.0  # padding past the vocabulary is never picked
    token = torch.zeros(3, dtype=torch.long, device=DEVICE)
    seen = torch.zeros(3, V, dtype=torch.bool, device=DEVICE)
    pos = torch.tensor([41], device=DEVICE)
    greedy_kernel[(3,)](logits, token, seen.view(torch.uint8), pos, V, logits.stride(0), BLOCK=4096, PDL=False)
    assert token.tolist() == logits[:, :V].argmax(-1).tolist() and token.tolist()[:2] == [5000, 100]
    assert seen.sum().item() == 3 and seen[torch.arange(3, device=DEVICE), token].all() and pos.item() == 42


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
@pytest.mark.parametrize("batch", [1, 3])
def test_every_matrix_has_a_block_shape_to_tune(preset, batch):
    """The tuner picks among `candidates()`, and on a GPU the first one is the default: a model narrower
    than every listed BLOCK_K (tiny's K = 32) still gets a shape that fits it (it had none: IndexError)."""
    model = make_model(preset)
    model.setup_caches(batch, 32)
    dec = TritonDecoder(model, sample=None, greedy=True)
    for mv in dec.matvecs():
        shapes = mv.candidates()
        assert shapes, f"no block shape for M={mv.M} N={mv.N} K={mv.K}"
        assert all(c[1] <= max(mv.K, 64 if batch > 1 else 256) for c in shapes)
    model.clear_caches()


def test_attention_splits_follow_the_block_size():
    """One split per block of the cache (at most 16), fewer where the batch's heads already make ~512
    programs: the split count each of `ATTN_CONFIGS` is timed with."""
    assert attention_splits(512, 16) == 8  # 64-slot blocks
    assert attention_splits(512, 16, block=32) == 16
    assert attention_splits(512, 16, block=128) == 4
    assert attention_splits(2048, 16, block=32) == MAX_SPLITS
    assert attention_splits(2048, 32 * 16) == 1  # batch 32
    assert attention_splits(100, 16, block=128) == 1
    for block, warps in ATTN_CONFIGS:
        assert block & (block - 1) == 0 and warps in (1, 2, 4, 8, 16)


def test_tuning_results_persist_for_the_next_process(tmp_path, monkeypatch):
    """What one process tuned is saved in the compile cache and a new model's decoders start from it (a second
    start times nothing again); the file merges what different processes tuned, and a damaged file is a
    cold cache, not an error."""
    from antimatter.model.triton_decoder import model_tuning, tuning_file

    monkeypatch.setenv("ANTIMATTER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    path = tuning_file()
    assert path.is_relative_to(tmp_path / "cache" / "compile")
    assert model_tuning(make_model("tiny")).best == {}  # nothing saved yet

    first = DecodeTuning()
    first.best[("GPU X", (64, 32, "gelu"), True)] = (32, 64, 4, 1)
    first.ranked[("GPU X", (64, 32, "gelu"), True)] = [(32, 64, 4, 1), (16, 128, 4, 2)]
    first.best[("GPU X", "step", ((64, 32, "gelu"),), 64, 4, 2, True)] = {(64, 32, "gelu"): (16, 128, 4, 2)}
    first.save(path)
    second = DecodeTuning()
    second.best[("GPU Y", "attention", 2, 16, 8, 16, False)] = (64, 4, 1)
    second.save(path)

    loaded = model_tuning(make_model("tiny"))
    assert loaded.best == {**first.best, **second.best} and loaded.ranked == first.ranked
    assert list(tmp_path.rglob("*.tmp")) == []

    path.write_text("{'best': {('GPU X',", "utf-8")  # cut short by a crash or a full disk
    assert DecodeTuning.load(path).best == {}
    path.write_text("__import__('os').remove('x')", "utf-8")  # never run as code
    assert DecodeTuning.load(path).best == {}
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    first.save(blocker / "tuning.txt")  # cannot be written: the next start tunes again, no error
    assert blocker.read_text() == ""
