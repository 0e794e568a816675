"""Token shards are checked before they are used: the tokenizer that made them, a checksum of their bytes and
the range of their ids. Without these, tokens scored by another tokenizer give a plausible but wrong bits per
byte, and a flipped byte gives an IndexError mid-training or a silently different stream."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import xxhash
from test_tokenizer import make_corpus
from train_helpers import make_tokens, one_thread, tiny_config

from antimatter.config import load_config
from antimatter.errors import UserError
from antimatter.eval.report import run_eval
from antimatter.provenance import sha256_file
from antimatter.tokenizer import train_tokenizer
from antimatter.tokens import HEADER_BYTES, TokenShards, read_header, run_tokenize, write_shard
from antimatter.train.trainer import train

assert one_thread  # the autouse fixture, imported so pytest uses it here

FIX = "antimatter tokenize --force"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real run trained a few steps (tokenizer A), and a second real tokenizer B of another vocabulary."""
    root = tmp_path_factory.mktemp("integrity")
    run = root / "run"
    make_corpus(run)
    cfg = tiny_config(run, max_steps=4, ckpt_interval=4, eval_interval=4, micro_batch_size=2)
    train_tokenizer(cfg, run / "data", run / "tokenizer")
    run_tokenize(cfg, run / "data", run / "tokenizer", run / "tokens")
    train(cfg, run)
    other = load_config(None, ["model=tiny", "tokenizer.vocab_size=300"])
    train_tokenizer(other, run / "data", root / "tokenizer_b")
    return {"run": run, "tokenizer_b": root / "tokenizer_b"}


def clone(base: dict[str, Path], dest: Path) -> Path:
    shutil.copytree(base["run"], dest, ignore=shutil.ignore_patterns("results", "train.lock"))
    return dest


def swap_tokenizer(run: Path, base: dict[str, Path]) -> None:
    """Replace the run's tokenizer with tokenizer B, leaving the tokens made by A."""
    shutil.rmtree(run / "tokenizer")
    shutil.copytree(base["tokenizer_b"], run / "tokenizer")


def eval_cfg(run: Path):
    return load_config(run / "config.yaml", [
        "eval.device=cpu", "eval.max_eval_tokens=200", "eval.speed=false", "eval.plots=false",
        "eval.continuation_docs=2", "eval.prefix_tokens=8", "eval.continuation_tokens=4",
        "eval.sample.max_new_tokens=4", "eval.by_source=false"])


def flip_token(shard: Path, index: int = 5) -> None:
    """Change one token id in place to another valid id (what a checksum, not a range check, must catch)."""
    data = bytearray(shard.read_bytes())
    itemsize = read_header(shard)["dtype"].itemsize
    at = HEADER_BYTES + index * itemsize
    old = int.from_bytes(data[at:at + itemsize], "little")
    data[at:at + itemsize] = ((old + 1) % 256).to_bytes(itemsize, "little")
    tmp = shard.with_name(shard.name + ".new")  # a new file (inode), as a rewrite or copy makes
    tmp.write_bytes(bytes(data))
    tmp.replace(shard)


def old_shard(path: Path, tokens: np.ndarray, vocab_size: int, eot_id: int = 0) -> None:
    """A shard as written before checksums: the same header with its 32 trailing bytes all zero."""
    write_shard(path, tokens, vocab_size, eot_id)
    data = bytearray(path.read_bytes())
    data[32:HEADER_BYTES] = bytes(HEADER_BYTES - 32)
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------ what tokenize records


def test_tokenize_records_the_tokenizer_and_a_checksum_per_shard(base: dict[str, Path]) -> None:
    run = base["run"]
    meta = json.loads((run / "tokens" / "meta.json").read_text())
    assert meta["tokenizer_sha256"] == sha256_file(run / "tokenizer" / "tokenizer.json")
    for split in ("train", "val"):
        for entry in meta["splits"][split]["shards"]:
            shard = run / "tokens" / entry["file"]
            body = shard.read_bytes()[HEADER_BYTES:]
            assert read_header(shard)["checksum"] == xxhash.xxh3_128_digest(body)
            assert entry["checksum"] == xxhash.xxh3_128_hexdigest(body)


# --------------------------------------------------------------------------- tokens of another tokenizer


def test_training_refuses_tokens_made_by_another_tokenizer(base: dict[str, Path], tmp_path: Path) -> None:
    run = clone(base, tmp_path / "run")
    swap_tokenizer(run, base)
    cfg = tiny_config(run, max_steps=8, resume="none", micro_batch_size=2)
    with pytest.raises(UserError, match=r"tokenizer\.json is not the tokenizer that made the tokens in .*"
                                        r"meta\.json.*antimatter tokenize --force") as e:
        train(cfg, run)
    assert "\n" not in str(e.value)


def test_eval_refuses_tokens_made_by_another_tokenizer(base: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    from antimatter.cli import main

    run = clone(base, tmp_path / "run")
    swap_tokenizer(run, base)
    assert main(["eval", "--run", str(run), "eval.device=cpu", "eval.speed=false", "eval.plots=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("antimatter eval: error: ") and "\n" not in err, err
    assert str(run / "tokenizer" / "tokenizer.json") in err and str(run / "tokens" / "meta.json") in err
    assert FIX in err


def test_eval_refuses_a_checkpoint_trained_with_another_tokenizer(base: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    run = clone(base, tmp_path / "run")
    swap_tokenizer(run, base)
    cfg = tiny_config(run)
    run_tokenize(cfg, run / "data", run / "tokenizer", run / "tokens")  # tokens and tokenizer agree again
    with pytest.raises(UserError, match=r"checkpoint .*step_000004 was trained with another tokenizer .*"
                                        r"tokenizer\.json"):
        run_eval(eval_cfg(run), run)


def test_generate_and_export_refuse_a_checkpoint_trained_with_another_tokenizer(base: dict[str, Path],
                                                                               tmp_path: Path) -> None:
    """Sampling or exporting a checkpoint with a tokenizer it was not trained with would decode its ids
    into the wrong text (or ship a mismatched tokenizer): both refuse, like eval."""
    from antimatter.export import export_hf
    from antimatter.llm import LLM

    run = clone(base, tmp_path / "run")
    swap_tokenizer(run, base)
    with pytest.raises(UserError, match=r"checkpoint .*step_000004 was trained with another tokenizer .*generate"):
        LLM.load(run, checkpoint="latest", device="cpu")
    with pytest.raises(UserError, match=r"checkpoint .*step_000004 was trained with another tokenizer .*export"):
        export_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_resume_refuses_a_checkpoint_trained_with_another_tokenizer(base: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    run = clone(base, tmp_path / "run")
    swap_tokenizer(run, base)
    cfg = tiny_config(run, max_steps=8, micro_batch_size=2)
    run_tokenize(cfg, run / "data", run / "tokenizer", run / "tokens")
    with pytest.raises(UserError, match=r"step_000004 was trained on tokens of another tokenizer .*"
                                        r"train a new run \(--name NEW\)"):
        train(cfg, run)


def test_checkpoint_records_its_tokenizer_and_a_matching_run_still_works(base: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    import torch

    run = clone(base, tmp_path / "run")
    state = torch.load(run / "checkpoints" / "step_000004" / "state.pt", weights_only=True)
    assert state["tokenizer_sha256"] == sha256_file(run / "tokenizer" / "tokenizer.json")
    manifest = json.loads((run / "checkpoints" / "step_000004" / "manifest.json").read_text())
    assert manifest["tokenizer_sha256"] == state["tokenizer_sha256"]  # readable without loading the state
    res = run_eval(eval_cfg(run), run)
    assert res["val"]["tokens"] > 0 and np.isfinite(res["val"]["bits_per_byte"])
    assert train(tiny_config(run, max_steps=6, ckpt_interval=4, eval_interval=4, micro_batch_size=2),
                 run)["steps"] == 6


# ------------------------------------------------------------------------------------- changed bytes


def test_changed_train_shard_is_refused_by_training(base: dict[str, Path], tmp_path: Path) -> None:
    run = clone(base, tmp_path / "run")
    shard = run / "tokens" / "train" / "00000.bin"
    flip_token(shard)
    with pytest.raises(UserError, match=rf"token shard {re.escape(str(shard))} .*checksum.*{FIX}"):
        train(tiny_config(run, max_steps=8, micro_batch_size=2), run)


def test_changed_val_shard_is_refused_not_skipped(base: dict[str, Path], tmp_path: Path) -> None:
    """A damaged val shard stops training and eval; it is not logged as 'validation skipped'."""
    run = clone(base, tmp_path / "run")
    shard = run / "tokens" / "val" / "00000.bin"
    flip_token(shard, index=3)
    with pytest.raises(UserError, match=rf"token shard {re.escape(str(shard))} .*checksum.*{FIX}"):
        train(tiny_config(run, max_steps=8, micro_batch_size=2), run)
    with pytest.raises(UserError, match=rf"token shard {re.escape(str(shard))} .*checksum.*{FIX}"):
        run_eval(eval_cfg(run), run)


def test_old_shards_without_checksum_still_load(tmp_path: Path) -> None:
    run = make_tokens(tmp_path / "run")
    tokens = {}
    for split in ("train", "val"):
        shard = run / "tokens" / split / "00000.bin"
        tokens[split] = TokenShards(shard.parent).read(0, read_header(shard)["num_tokens"])
        old_shard(shard, tokens[split].astype(np.uint16), vocab_size=512)
        assert read_header(shard)["checksum"] is None
        assert np.array_equal(TokenShards(shard.parent).read(0, len(tokens[split])), tokens[split])
    assert train(tiny_config(run, max_steps=4), run)["steps"] == 4


def test_shards_are_verified_once_per_process(tmp_path: Path) -> None:
    """A shard's bytes are read once per process: a later TokenShards of the same file, unchanged by its key
    (path, inode, size, mtime), trusts the first check; a file with a new mtime or inode is checked again."""
    shard = tmp_path / "00000.bin"
    write_shard(shard, np.arange(1000, dtype=np.uint16), vocab_size=1000, eot_id=0)
    TokenShards(tmp_path)
    st = shard.stat()
    with open(shard, "r+b") as f:  # damage token 5 in place (same inode and size), then restore the mtime
        f.seek(HEADER_BYTES + 5 * 2)
        f.write((6).to_bytes(2, "little"))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    for _ in range(2):  # not read again: the damage goes unseen, as only a second scan could see it
        assert TokenShards(tmp_path).read(5, 1)[0] == 6
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a write now: checked again
    with pytest.raises(UserError, match="checksum"):
        TokenShards(tmp_path)
    write_shard(shard, np.arange(1000, dtype=np.uint16), vocab_size=1000, eot_id=0)
    TokenShards(tmp_path)
    flip_token(shard)  # a rewritten file (new inode) is checked again
    with pytest.raises(UserError, match="checksum"):
        TokenShards(tmp_path)


# ------------------------------------------------------------------------------------ ids out of range


def test_out_of_range_id_is_refused_before_training(tmp_path: Path) -> None:
    run = make_tokens(tmp_path / "run")
    shard = run / "tokens" / "train" / "00000.bin"
    ids = TokenShards(shard.parent).read(0, read_header(shard)["num_tokens"]).astype(np.uint16)
    ids[1234] = 600  # what a flipped high bit does; the checksum of an old shard cannot catch it
    old_shard(shard, ids, vocab_size=512)
    with pytest.raises(UserError, match=rf"token shard {re.escape(str(shard))} holds token id 600, but the "
                                        rf"vocabulary has 512 ids.*{FIX}"):
        train(tiny_config(run, max_steps=4), run)


def test_ids_are_checked_against_the_model_vocabulary(tmp_path: Path) -> None:
    write_shard(tmp_path / "00000.bin", np.array([0, 5, 700, 3], dtype=np.uint16), vocab_size=1000, eot_id=0)
    assert len(TokenShards(tmp_path)) == 4
    with pytest.raises(UserError, match=r"00000\.bin holds token id 700, but the model's vocabulary has 512 "
                                        r"ids"):
        TokenShards(tmp_path, vocab_size=512)



@pytest.mark.parametrize("text", ["{", "[]", '{"vocab_size": "many"}'])
def test_a_damaged_meta_json_is_one_line_for_eval_and_train(base, tmp_path, text):
    """Cut, not an object, or without a usable vocab_size: a UserError naming the file and the fix, where
    eval and train raised json's or a KeyError's traceback (and the tokenizer check was silently skipped)."""
    run = clone(base, tmp_path / "run")
    (run / "tokens" / "meta.json").write_text(text)
    with pytest.raises(UserError, match=re.escape(f"{run / 'tokens' / 'meta.json'} is damaged") + f".*{FIX}"):
        run_eval(eval_cfg(run), run)
    with pytest.raises(UserError, match=re.escape(f"{run / 'tokens' / 'meta.json'} is damaged") + f".*{FIX}"):
        train(tiny_config(run, max_steps=6, ckpt_interval=6, eval_interval=0, micro_batch_size=2), run)
