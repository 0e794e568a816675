"""Hugging Face export / import: logits parity with transformers, greedy parity, exact round trips, dtypes,
tokenizer and model card, run-level wrappers, and clear errors for bad folders."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from antimatter.config import ModelConfig, RunConfig, preset_model
from antimatter.errors import UserError
from antimatter.export import export_hf, export_model, import_hf, init_weights_from, load_hf_model
from antimatter.model.gpt import GPT

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "gpt2-tied": dict(preset="tiny"),
    "gpt2-untied-nobias": dict(preset="tiny", tie_embeddings=False, bias=False, d_ff=80, norm_eps=1e-3),
    "llama-mha-tied": dict(preset="llama-tiny", n_kv_head=None, tie_embeddings=True, qk_norm=False),
    "llama-gqa-untied": dict(preset="llama-tiny", qk_norm=False, rope_theta=50000.0),
    "llama-gqa-bias": dict(preset="llama-tiny", qk_norm=False, bias=True),
    "llama-tiny-qknorm": dict(preset="llama-tiny"),  # the preset: GQA, untied, QK-norm -> Qwen3
}
HF_CLASS = {"gpt2-tied": "GPT2LMHeadModel", "gpt2-untied-nobias": "GPT2LMHeadModel",
            "llama-mha-tied": "LlamaForCausalLM", "llama-gqa-untied": "LlamaForCausalLM",
            "llama-gqa-bias": "LlamaForCausalLM", "llama-tiny-qknorm": "Qwen3ForCausalLM"}


def make_model(name: str, seed: int = 0) -> GPT:
    """A tiny model with random weights everywhere (norm gains and biases too, so a swapped or missing
    tensor shows up in the logits), large enough init that greedy choices are not near-ties."""
    over = dict(CONFIGS[name])
    cfg = dataclasses.replace(preset_model(over.pop("preset")), init_std=0.1, **over)
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def real_rows(model: GPT) -> dict[str, torch.Tensor]:
    """State dict with the embedding / head cut to the real vocab (padding rows are never exported)."""
    V = model.cfg.vocab_size
    return {k: v[:V] if k in ("transformer.wte.weight", "lm_head.weight") else v
            for k, v in model.state_dict().items()}


def greedy(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Our greedy continuation: argmax of the full-sequence logits, one token at a time (no cache)."""
    with torch.no_grad():
        for _ in range(n):
            idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    """A real byte-level BPE (the tokenizer stage's recipe) trained on a few sentences."""
    from tokenizers import pre_tokenizers, trainers

    from antimatter.tokenizer import EOT, new_byte_level_bpe

    tok = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog. " * 3, "hello world, hello there"] * 20,
                            trainer=trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


# ------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_transformers(name, tmp_path):
    model = make_model(name)
    out = export_model(model, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == [HF_CLASS[name]]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == HF_CLASS[name]

    torch.manual_seed(1)
    x = torch.randint(0, model.cfg.vocab_size, (2, model.cfg.block_size))
    with torch.no_grad():
        diff = (model(x) - hf(x).logits).abs().max().item()
    print(f"{name}: max |logits diff| = {diff:.3g}")
    assert diff < 1e-4

    prompt = x[:1, :8]
    ours = greedy(model, prompt, 16)
    theirs = hf.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)

    back = load_hf_model(out)  # round trip: bitwise identical weights
    assert back.cfg == model.cfg
    a, b = real_rows(model), real_rows(back)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kv_cached_generate_matches_hf(tmp_path):
    """The lead's batched, KV-cached generate gives the same greedy tokens as transformers."""
    generate = pytest.importorskip("antimatter.model.generate").generate
    model = make_model("llama-tiny-qknorm")
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_model(model, tmp_path), dtype=torch.float32)
    prompt = [5, 17, 42, 99, 7]
    ours = generate(model, [prompt], 12, temperature=0.0)[0]
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs


def test_import_folders_written_by_transformers(tmp_path):
    """Folders saved by transformers itself (random HF init, non-zero biases) import with logits parity."""
    cfgs = [transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=4),
            transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                     rms_norm_eps=1e-5)]
    for i, c in enumerate(cfgs):
        torch.manual_seed(i)
        hf = transformers.AutoModelForCausalLM.from_config(c).eval()
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if n.endswith("bias") or "norm" in n or "ln_" in n:
                    p.add_(0.1 * torch.randn_like(p))
        hf.save_pretrained(tmp_path / str(i))
        ours = load_hf_model(tmp_path / str(i))
        x = torch.randint(0, 300, (2, 32))
        with torch.no_grad():
            assert (ours(x) - hf(x).logits).abs().max().item() < 1e-4


# -------------------------------------------------------------------------------- dtypes and files


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_export(dtype, torch_dtype, tmp_path):
    model = make_model("llama-gqa-untied")
    fp32 = export_model(model, tmp_path / "fp32")
    out = export_model(model, tmp_path / dtype, dtype=dtype)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == str(torch_dtype).removeprefix("torch.")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch_dtype}
    size16, size32 = (out / "model.safetensors").stat().st_size, (fp32 / "model.safetensors").stat().st_size
    assert size16 < 0.55 * size32
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert hf.dtype == torch_dtype
    back = load_hf_model(out)  # weights come back as the rounded fp32 values
    a, b = real_rows(model), real_rows(back)
    assert all(torch.equal(a[k].to(torch_dtype).float(), b[k]) for k in a)


def test_tokenizer_and_card(tokenizer_file, tmp_path):
    from tokenizers import Tokenizer

    model = make_model("gpt2-tied")
    stats = {"kept_docs": 1234, "provenance": {"git_commit": "abc"},
             "sources": {"shakespeare": {"kept_docs": 40, "kept_bytes": 999, "removed": {"short": {"docs": 1}}}}}
    ev = {"run": "runs/unit-run", "checkpoint": {"path": "runs/unit-run/checkpoints/step_000200", "step": 200},
          "val": {"perplexity": 42.5, "bits_per_byte": 1.25, "byte_count_method": "long text"},
          "data": {"val_shards": {"a.bin": "0" * 64}}}
    out = export_model(model, tmp_path / "hf", tokenizer_file=tokenizer_file,
                       card={"name": "unit-run", "data_statistics": stats, "evaluation": ev,
                             "evaluation_checkpoint": ev["checkpoint"]["path"], "checkpoint": "step_000300"})
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    assert tok.eos_token_id == Tokenizer.from_file(str(tokenizer_file)).token_to_id("<|endoftext|>")
    text = "hello world, the quick fox"
    assert tok(text).input_ids == Tokenizer.from_file(str(tokenizer_file)).encode(text).ids
    assert tok.decode(tok(text).input_ids) == text
    cfg = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert cfg["eos_token_id"] == cfg["bos_token_id"] == gen["eos_token_id"] == tok.eos_token_id
    card = (out / "README.md").read_text()
    assert f"{model.num_params():,}" in card and "GPT2LMHeadModel" in card
    assert "| kept_docs | 1234 |" in card and "| sources.shakespeare.kept_bytes | 999 |" in card
    assert "| val.perplexity | 42.5 |" in card and "| checkpoint.step | 200 |" in card
    assert "figures are for checkpoint `step_000200`; this export is checkpoint `step_000300`" in card
    assert "git_commit" not in card and "0" * 64 not in card and "long text" not in card
    bare = (export_model(model, tmp_path / "bare") / "README.md").read_text()
    assert "No evaluation results were recorded" in bare and "No dataset statistics" in bare


# ---------------------------------------------------------------------------------- run wrappers


def _make_run(tmp_path: Path, tokenizer_file: Path) -> tuple[Path, GPT]:
    from antimatter.checkpoint import save_checkpoint

    model = make_model("llama-tiny-qknorm")
    cfg = RunConfig(name="src", runs_dir=str(tmp_path))
    cfg.model = model.cfg
    run = cfg.run_dir
    (run / "tokenizer").mkdir(parents=True)
    (run / "tokenizer" / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    (run / "data").mkdir()
    (run / "data" / "dataset_statistics.json").write_text(json.dumps({"kept_docs": 77}))
    ckpt = save_checkpoint(run / "checkpoints", 10, model.state_dict(), {"step": 10}, cfg, best=True)
    (run / "results" / "evaluations").mkdir(parents=True)
    (run / "results" / "evaluations" / "final_evaluation.json").write_text(
        json.dumps({"checkpoint": {"path": str(ckpt), "step": 10}, "val": {"bits_per_byte": 3.25}}))
    return run, model


def test_export_import_run_round_trip(tokenizer_file, tmp_path):
    from antimatter.checkpoint import load_model

    run, model = _make_run(tmp_path, tokenizer_file)
    out = export_hf(run, tmp_path / "hf", checkpoint="best", dtype="fp32")
    for folder, beside in ((out, "config.json"), (run / "checkpoints" / "step_000010", "config.yaml")):
        mode = (folder / "model.safetensors").stat().st_mode & 0o777  # safetensors wrote 0o600
        assert mode == (folder / beside).stat().st_mode & 0o777, oct(mode)
    card = (out / "README.md").read_text()
    assert "| kept_docs | 77 |" in card and "| val.bits_per_byte | 3.25 |" in card and "Note" not in card
    assert (out / "tokenizer.json").is_file()

    new_run = import_hf(out, tmp_path / "imported")
    loaded, cfg, ckpt = load_model(new_run, "best")
    assert ckpt.name == "step_000000" and cfg.model == model.cfg
    assert (new_run / "tokenizer" / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()
    assert (new_run / "config.yaml").is_file()
    a, b = real_rows(model), real_rows(loaded)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="already has checkpoints"):
        import_hf(out, new_run)
    prepared = tmp_path / "prepared-run"  # a run folder with data and its own tokenizer, no checkpoints yet
    (prepared / "tokenizer").mkdir(parents=True)
    (prepared / "tokenizer" / "tokenizer.json").write_text('{"another": "tokenizer"}')
    with pytest.raises(UserError, match="already has another tokenizer .*: choose a new --out folder; nothing"):
        import_hf(out, prepared)
    assert (prepared / "tokenizer" / "tokenizer.json").read_text() == '{"another": "tokenizer"}'


def test_export_names_a_checkpoint_of_the_run_by_its_step_folder(tokenizer_file, tmp_path, monkeypatch):
    """`export --run RUN --checkpoint step_000010`, as eval and generate take it: the name is the run's step
    folder, not a path from the current folder."""
    run, _ = _make_run(tmp_path, tokenizer_file)
    monkeypatch.chdir(tmp_path)
    out = export_hf(run, tmp_path / "hf", checkpoint="step_000010")
    assert "step_000010" in (out / "README.md").read_text()
    with pytest.raises(UserError, match="checkpoint 'step_000099' not found in .*: use best, latest or a step"):
        export_hf(run, tmp_path / "hf2", checkpoint="step_000099")


def test_export_of_a_run_without_its_tokenizer_says_so(tokenizer_file, tmp_path, capsys):
    run, _ = _make_run(tmp_path, tokenizer_file)
    (run / "tokenizer" / "tokenizer.json").unlink()
    out = export_hf(run, tmp_path / "hf")
    assert not (out / "tokenizer.json").exists()
    err = capsys.readouterr().err
    assert "has no tokenizer" in err and "earlier export" not in err
    export_hf(run, tmp_path / "hf")  # again into the same folder: said
    assert "held an earlier export; its files are replaced" in capsys.readouterr().err


def test_cli_export_and_import(tokenizer_file, tmp_path, capsys):
    from antimatter.cli import main

    run, _ = _make_run(tmp_path, tokenizer_file)
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "hf16"), "--dtype", "fp16"]) == 0
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["torch_dtype"] == "float16"
    assert main(["import", "--hf", str(tmp_path / "hf16"), "--out", str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "checkpoints" / "best").is_file()
    assert main(["import", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "Hugging Face folder not found" in capsys.readouterr().err


# ---------------------------------------------------------------------- import from a Hugging Face Hub id

REV = "0123456789abcdef0123456789abcdef01234567"


def tiny_hf_folder(path: Path, tokenizer_file: Path, n_layer: int) -> Path:
    """A GPT-2 folder as transformers saves it (tiny sizes), with a tokenizer."""
    cfg = transformers.GPT2Config(vocab_size=320, n_positions=32, n_embd=32, n_layer=n_layer, n_head=2)
    torch.manual_seed(n_layer)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    shutil.copyfile(tokenizer_file, path / "tokenizer.json")
    return path


def hub_cache(root: Path, repo_id: str, folder: Path) -> Path:
    """`root` laid out as HF_HUB_CACHE after a download of `repo_id`: models--ORG--NAME/snapshots/REV/...
    and refs/main naming REV."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / REV)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    return root


def offline_cli(*args: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    """`antimatter ARGS` in a fresh process that may not use the network, with its own Hub cache."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cwd / "hf_home"),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "antimatter.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_import_a_hub_id_from_the_cache_offline(tokenizer_file, tmp_path):
    from antimatter.checkpoint import load_model

    cache = hub_cache(tmp_path / "cache", "tiny-org/tiny-gpt2", tiny_hf_folder(tmp_path / "m", tokenizer_file, 1))
    r = offline_cli("import", "--hf", "tiny-org/tiny-gpt2", "--out", "runs/hub", cwd=tmp_path, cache=cache)
    assert r.returncode == 0, r.stderr
    snapshot = cache / "models--tiny-org--tiny-gpt2" / "snapshots" / REV
    assert r.stdout.startswith(f"imported tiny-org/tiny-gpt2 ({snapshot}) (")
    model, cfg, _ = load_model(tmp_path / "runs" / "hub", "best")
    assert (cfg.model.n_layer, cfg.model.vocab_size) == (1, 320)
    assert (tmp_path / "runs" / "hub" / "tokenizer" / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()
    hf = transformers.GPT2LMHeadModel.from_pretrained(snapshot).eval()
    x = torch.randint(0, 320, (1, 16))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() < 1e-4


def test_a_local_folder_wins_over_the_hub_id_of_the_same_name(tokenizer_file, tmp_path):
    from antimatter.checkpoint import load_model

    cache = hub_cache(tmp_path / "cache", "tiny-org/tiny-gpt2", tiny_hf_folder(tmp_path / "m", tokenizer_file, 1))
    (tmp_path / "tiny-org").mkdir()
    tiny_hf_folder(tmp_path / "tiny-org" / "tiny-gpt2", tokenizer_file, 2)
    r = offline_cli("import", "--hf", "tiny-org/tiny-gpt2", "--out", "runs/local", cwd=tmp_path, cache=cache)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("imported tiny-org/tiny-gpt2 (")
    assert load_model(tmp_path / "runs" / "local", "best")[1].model.n_layer == 2


def test_an_id_neither_local_nor_cached_offline_is_one_line(tmp_path):
    (tmp_path / "cache").mkdir()
    r = offline_cli("import", "--hf", "tiny-org/missing", "--out", "runs/x", cwd=tmp_path, cache=tmp_path / "cache")
    assert "Traceback" not in r.stderr and r.returncode == 2
    assert r.stderr.strip() == (
        f"antimatter import: error: tiny-org/missing is neither a local folder nor a model in the Hugging Face "
        f"cache ({tmp_path / 'cache'}), and HF_HUB_OFFLINE=1 keeps the Hub out of reach: check the path, or fetch "
        f"the model once with network access")
    assert not (tmp_path / "runs").exists()


def test_a_hub_id_without_huggingface_hub_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as in an environment without it
    monkeypatch.chdir(tmp_path)  # no such local folder
    with pytest.raises(UserError) as e:
        import_hf("tiny-org/tiny-gpt2", tmp_path / "run")
    assert str(e.value) == ("tiny-org/tiny-gpt2 is not a local folder, and fetching it as a Hugging Face Hub id "
                            "needs huggingface_hub: pip install 'antimatter[hf]'")


def test_init_weights_from_hf_folder(tokenizer_file, tmp_path):
    src = make_model("gpt2-tied")
    out = export_model(src, tmp_path / "hf", tokenizer_file=tokenizer_file)
    fresh = GPT(src.cfg).eval()
    path, sd = init_weights_from(out, src.cfg)
    fresh.load_state_dict(sd)  # strict: exactly the run model's tensors
    x = torch.randint(0, src.cfg.vocab_size, (1, 16))
    with torch.no_grad():
        assert path == out and torch.equal(fresh(x), src(x))
    shorter = dataclasses.replace(src.cfg, block_size=32, pad_vocab_multiple=500)  # positions cut, rows padded
    GPT(shorter).load_state_dict(init_weights_from(out, shorter)[1])
    with pytest.raises(UserError, match="vocab mismatch: .* vocab_size=512 but model.vocab_size=1024"):
        init_weights_from(out, dataclasses.replace(src.cfg, vocab_size=1024))
    with pytest.raises(UserError, match="n_layer=2 but this run's model has n_layer=3: set model.n_layer=2"):
        init_weights_from(out, dataclasses.replace(src.cfg, n_layer=3))
    with pytest.raises(UserError, match="has activation=gelu but this run's model has activation=relu2"):
        init_weights_from(out, dataclasses.replace(src.cfg, activation="relu2"))
    with pytest.raises(UserError, match="block_size=64, shorter than this run's model.block_size=128"):
        init_weights_from(out, dataclasses.replace(src.cfg, block_size=128))


def test_init_weights_from_hf_folder_checks_the_tokenizer(tokenizer_file, tmp_path):
    from tokenizers import Tokenizer

    cfg = make_model("llama-gqa-untied").cfg
    out = export_model(GPT(cfg), tmp_path / "hf", tokenizer_file=tokenizer_file)
    init_weights_from(out, cfg, tokenizer_file)  # the very file
    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.save(str(tmp_path / "same.json"), pretty=False)  # other bytes, the same token ids
    assert (tmp_path / "same.json").read_bytes() != tokenizer_file.read_bytes()
    init_weights_from(out, cfg, tmp_path / "same.json")
    tok.add_tokens(["<|extra|>"])
    tok.save(str(tmp_path / "other.json"))
    with pytest.raises(UserError, match="tokenizer.json is another tokenizer than this run's .*other.json"):
        init_weights_from(out, cfg, tmp_path / "other.json")
    with pytest.raises(UserError, match="is another tokenizer than this run's \\(sha256 0123456789ab\\)"):
        init_weights_from(out, cfg, tokenizer_sha256="0123456789ab" * 5)
    imported = import_hf(out, tmp_path / "imported")  # records its tokenizer: a run of it is checked the same way
    assert init_weights_from(imported, cfg, tokenizer_file)[0].name == "step_000000"
    with pytest.raises(UserError, match="was trained with another tokenizer .*: train from it with the run"):
        init_weights_from(imported, cfg, tmp_path / "other.json")


def test_train_starts_from_hf_folder(tokenizer_file, tmp_path):
    """`train.init_from` names a Hugging Face folder: the run starts from exactly its weights."""
    from tokenizers import Tokenizer
    from train_helpers import make_tokens, tiny_config

    from antimatter.train.trainer import train

    run = make_tokens(tmp_path / "run")
    cfg = tiny_config(run, max_steps=1, lr=1e-9, warmup_steps=0, init_from=str(tmp_path / "hf"))
    torch.manual_seed(1)
    src = GPT(cfg.model)
    export_model(src, tmp_path / "hf", tokenizer_file=tokenizer_file)
    train(cfg, run)
    assert "initialised weights from" in (run / "logs" / "train.log").read_text()
    trained = load_file(str(run / "checkpoints" / "step_000001" / "model.safetensors"))
    assert max((v - trained[k]).abs().max().item() for k, v in real_rows(src).items()
               if k != "lm_head.weight") < 1e-6
    other = Tokenizer.from_file(str(tokenizer_file))
    other.add_tokens(["<|extra|>"])
    (run / "tokenizer").mkdir()
    other.save(str(run / "tokenizer" / "tokenizer.json"))
    with pytest.raises(UserError, match="is another tokenizer than this run's"):
        train(tiny_config(run, init_from=str(tmp_path / "hf"), resume="none"), run)


# ------------------------------------------------------------------------------------------ bad input


def test_bad_folders(tmp_path):
    with pytest.raises(UserError, match="Hugging Face folder not found"):
        load_hf_model(tmp_path / "missing")
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(UserError, match="is not a folder"):
        load_hf_model(tmp_path / "file.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        load_hf_model(tmp_path / "empty")
    out = export_model(make_model("gpt2-tied"), tmp_path / "hf")
    (out / "model.safetensors").unlink()
    with pytest.raises(UserError, match="has no weights"):
        load_hf_model(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        load_hf_model(out)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    with pytest.raises(UserError, match="unsupported architecture 'BertForMaskedLM'.*GPT2LMHeadModel"):
        load_hf_model(tmp_path)
    model = make_model("llama-gqa-untied")
    out = export_model(model, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="unsupported RoPE scaling 'yarn'"):
        load_hf_model(out)


def test_unexportable_configs(tmp_path):
    with pytest.raises(UserError, match="qk_norm=true and bias=true"):
        export_model(GPT(dataclasses.replace(preset_model("llama-tiny"), bias=True)), tmp_path)
    with pytest.raises(UserError, match="gpt2-style model with grouped-query attention"):
        export_model(GPT(ModelConfig(n_layer=1, n_head=4, n_kv_head=2, d_model=32, vocab_size=300,
                                     block_size=16)), tmp_path)
    with pytest.raises(UserError, match="unknown export dtype 'int8'"):
        export_model(make_model("gpt2-tied"), tmp_path, dtype="int8")
    assert not (tmp_path / "model.safetensors").exists()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds files that are not from an earlier AntiMatter export \\(notes.txt\\)"):
        export_model(make_model("gpt2-tied"), tmp_path)


USER_FILES = {  # a user's file with an export's name, in a folder that holds no earlier export
    "README.md": "my notes\n",
    "config.json": '{"my": "settings"}\n',
    "tokenizer.json": '{"version": "1.0"}\n',
    "model.safetensors": "weights of my own\n",
}


@pytest.mark.parametrize("names", [["README.md"], ["config.json"], ["tokenizer.json"], ["model.safetensors"],
                                   ["config.json", "model.safetensors"]], ids="+".join)
def test_export_refuses_to_replace_files_it_did_not_write(tmp_path, names):
    """A file that merely has an export's name (README.md, config.json, ...) is the user's: only an earlier
    export's files are replaced, and a transformers config.json is not ours (no "antimatter" section)."""
    out = tmp_path / "mine"
    out.mkdir()
    for name in names:
        (out / name).write_text(USER_FILES[name])
    with pytest.raises(UserError) as e:
        export_model(make_model("gpt2-tied"), out)
    msg = str(e.value)
    assert "\n" not in msg and all(name in msg for name in names)
    assert msg.endswith("choose a new or empty folder for --out, or remove those files")
    assert {p.name: p.read_text() for p in out.iterdir()} == {name: USER_FILES[name] for name in names}


def test_cli_export_refuses_a_folder_with_the_users_readme(tokenizer_file, tmp_path, capsys):
    """The reported case: `antimatter export --out mydir` where mydir holds the user's README.md."""
    from antimatter.cli import main

    run, _ = _make_run(tmp_path, tokenizer_file)
    mydir = tmp_path / "mydir"
    mydir.mkdir()
    (mydir / "README.md").write_text("my notes\n")
    assert main(["export", "--run", str(run), "--out", str(mydir)]) == 2
    assert "README.md" in capsys.readouterr().err
    assert [p.name for p in mydir.iterdir()] == ["README.md"] and (mydir / "README.md").read_text() == "my notes\n"


def test_reexport_replaces_an_earlier_export_but_keeps_the_users_files(tmp_path, capsys):
    out = export_model(make_model("gpt2-tied"), tmp_path / "hf")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not from an earlier AntiMatter export \\(notes.txt\\)"):
        export_model(make_model("llama-gqa-untied"), out)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    export_model(make_model("llama-gqa-untied"), out)
    assert "held an earlier export; its files are replaced" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_a_second_export_into_a_folder_in_use_is_refused(tmp_path):
    """Two exports into one folder at once would leave one's weights beside the other's config: while an
    export holds the folder (its lock, `.NAME.lock` beside the folder, held here by another process), a
    second is refused and writes nothing. The lock is not in the folder, so it is no foreign file there."""
    from subprocess import PIPE

    out = tmp_path / "hf"
    code = ("import sys\nfrom antimatter.files import exclusive_lock\n"
            "with exclusive_lock(sys.argv[1], 'an export'):\n    print('held', flush=True)\n    sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / ".hf.lock")], stdin=PIPE, stdout=PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError, match=f"export folder .*hf is in use by pid {holder.pid} "):
            export_model(make_model("gpt2-tied"), out)
        assert not out.exists()
    finally:
        holder.communicate("", timeout=60)  # end of its stdin: it lets go of the lock and exits
    export_model(make_model("gpt2-tied"), out)
    export_model(make_model("gpt2-tied"), out)  # again: the lock beside the folder is no file of the user's
    assert (tmp_path / ".hf.lock").is_file() and not any(p.name.endswith(".lock") for p in out.iterdir())


def test_reexport_replaces_stale_tokenizer(tokenizer_file, tmp_path):
    model = GPT(dataclasses.replace(preset_model("tiny"), vocab_size=512))
    export_model(model, tmp_path, tokenizer_file=tokenizer_file)
    assert (tmp_path / "tokenizer.json").is_file()
    export_model(model, tmp_path, dtype="bf16")  # same folder, no tokenizer this time
    assert not (tmp_path / "tokenizer.json").exists() and not (tmp_path / "tokenizer_config.json").exists()


def test_vocab_mismatch(tokenizer_file, tmp_path):
    model = make_model("gpt2-tied")
    out = export_model(model, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "vocab_size": 600}))
    with pytest.raises(UserError, match="vocab mismatch: config.json says vocab_size=600 but the embedding has 512"):
        load_hf_model(out)
    from tokenizers import Tokenizer

    n_tok = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size(with_added_tokens=True)
    small = GPT(dataclasses.replace(preset_model("tiny"), vocab_size=n_tok - 10))
    with pytest.raises(UserError, match=f"vocab mismatch: the tokenizer has {n_tok} tokens but the model's "
                                        f"vocab_size is {n_tok - 10}"):
        export_model(small, tmp_path / "small", tokenizer_file=tokenizer_file)
    out2 = export_model(GPT(dataclasses.replace(preset_model("tiny"), vocab_size=n_tok)), tmp_path / "ok",
                        tokenizer_file=tokenizer_file)
    cfg2 = json.loads((out2 / "config.json").read_text())
    sd = load_file(str(out2 / "model.safetensors"))
    sd["transformer.wte.weight"] = sd["transformer.wte.weight"][: n_tok - 10].clone()
    save_file(sd, str(out2 / "model.safetensors"), metadata={"format": "pt"})
    (out2 / "config.json").write_text(json.dumps({**cfg2, "vocab_size": n_tok - 10}))
    with pytest.raises(UserError, match=f"vocab mismatch: .*tokenizer.json has {n_tok} tokens but config.json "
                                        f"says vocab_size={n_tok - 10}"):
        load_hf_model(out2)


def test_weights_that_do_not_match_config(tmp_path):
    out = export_model(make_model("llama-gqa-untied"), tmp_path / "hf")
    sd = load_file(str(out / "model.safetensors"))
    extra = dict(sd, **{"model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2)})
    save_file(extra, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="not part of a LlamaForCausalLM model.*model.layers.9"):
        load_hf_model(out)
    del sd["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="missing 'model.layers.1.self_attn.k_proj.weight'"):
        load_hf_model(out)
