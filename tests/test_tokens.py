"""Token shards and loaders: exact encoding, header checks, the deterministic resumable window contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_tokenizer import TEXTS, make_corpus, write_split

from antimatter.config import load_config
from antimatter.data.records import iter_records, split_files
from antimatter.errors import UserError
from antimatter.tokenizer import load_tokenizer, train_tokenizer
from antimatter.tokens import (
    HEADER_BYTES,
    TokenShards,
    TokenWindows,
    eval_windows,
    open_shard,
    run_tokenize,
    token_dtype,
    write_shard,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("tokens")
    make_corpus(root)
    cfg = load_config(None, ["model=tiny", "tokenize.shard_tokens=3000", "tokenize.batch_docs=7"])
    train_tokenizer(cfg, root / "data", root / "tokenizer")
    return root, run_tokenize(cfg, root / "data", root / "tokenizer", root / "tokens")


def read_docs(split_dir: Path) -> list[str]:
    return [rec["text"] for f in split_files(split_dir) for rec, _ in iter_records(f)]


def test_shards_hold_every_document_exactly_with_eot_after_each(run):
    root, meta = run
    tok = load_tokenizer(root)
    on_disk = json.loads((root / "tokens" / "meta.json").read_text())
    assert on_disk["splits"] == meta["splits"]
    assert meta["dtype"] == "uint16" and meta["eot_id"] == tok.eot_id == 0 and meta["header_bytes"] == 64
    for split in ("train", "val"):
        docs = read_docs(root / "data" / split)
        shards = TokenShards(root / "tokens" / split)
        stream = shards.read(0, shards.num_tokens)
        s = meta["splits"][split]
        assert s["tokens"] == shards.num_tokens == sum(x["tokens"] for x in s["shards"])
        assert s["docs"] == len(docs) and s["bytes"] == sum(len(d.encode()) for d in docs)
        assert s["bytes_per_token"] == pytest.approx(s["bytes"] / s["tokens"], abs=1e-3)
        assert stream[-1] == tok.eot_id and (stream == tok.eot_id).sum() == len(docs)
        pieces = np.split(stream, np.flatnonzero(stream == tok.eot_id) + 1)[:-1]
        assert [tok.decode(p[:-1].tolist()) for p in pieces] == docs
    # shard_tokens=3000: the train stream spans several full shards and one partial
    sizes = [x["tokens"] for x in meta["splits"]["train"]["shards"]]
    assert len(sizes) > 2 and set(sizes[:-1]) == {3000} and 0 < sizes[-1] <= 3000


def test_rerun_replaces_old_shards(run, tmp_path):
    root, meta = run
    cfg = load_config(None, ["model=tiny"])  # default shard size: a single shard per split
    out = tmp_path / "tokens"
    (out / "train").mkdir(parents=True)
    (out / "train" / "00007.bin").write_bytes(b"stale")
    again = run_tokenize(cfg, root / "data", root / "tokenizer", out)
    assert [p.name for p in (out / "train").iterdir()] == ["00000.bin"]
    assert again["tokens"] == meta["tokens"]
    a, b = TokenShards(out / "train"), TokenShards(root / "tokens" / "train")
    assert np.array_equal(a.read(0, a.num_tokens), b.read(0, b.num_tokens))


def test_dtype_choice_and_uint32_shards(tmp_path):
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    ids = np.array([0, 70000, 5, 100_000], dtype=np.uint32)
    write_shard(tmp_path / "00000.bin", ids, vocab_size=100_001, eot_id=0)
    assert (tmp_path / "00000.bin").stat().st_size == HEADER_BYTES + 4 * 4
    arr = open_shard(tmp_path / "00000.bin")
    assert arr.dtype == np.uint32 and arr.tolist() == ids.tolist()


def test_truncated_and_foreign_shards_are_refused(tmp_path):
    write_shard(tmp_path / "00000.bin", np.arange(100, dtype=np.uint16), vocab_size=512, eot_id=0)
    data = (tmp_path / "00000.bin").read_bytes()
    (tmp_path / "00000.bin").write_bytes(data[:-3])
    with pytest.raises(UserError, match=r"token shard .*00000\.bin is truncated or corrupt: header says 100 "
                                        r"tokens .*re-run `antimatter tokenize`"):
        TokenShards(tmp_path)
    (tmp_path / "00000.bin").write_bytes(data[:10])
    with pytest.raises(UserError, match=r"token shard .*00000\.bin is truncated .*shorter than its header"):
        TokenShards(tmp_path)
    (tmp_path / "00000.bin").write_bytes(np.arange(100, dtype=np.uint16).tobytes())  # a raw nanoGPT .bin
    with pytest.raises(UserError, match=r".*00000\.bin is not an AntiMatter token shard \(bad magic"):
        TokenShards(tmp_path)
    (tmp_path / "00000.bin").write_bytes(data[:8] + (9).to_bytes(4, "little") + data[12:])
    with pytest.raises(UserError, match=r"00000\.bin has format version 9"):
        TokenShards(tmp_path)
    with pytest.raises(UserError, match=r"no token shards \(\*\.bin\) in .*missing: run `antimatter tokenize`"):
        TokenShards(tmp_path / "missing")


def make_stream(folder: Path, n: int, shard: int = 1000) -> np.ndarray:
    """A split whose token i is i % 50000 over shards of `shard` tokens: windows are identifiable."""
    tokens = (np.arange(n) % 50000).astype(np.uint16)
    for k, lo in enumerate(range(0, n, shard)):
        write_shard(folder / f"{k:05d}.bin", tokens[lo:lo + shard], vocab_size=50257, eot_id=0)
    return tokens


def window_ids(x: torch.Tensor, seq_len: int) -> list[int]:
    return [int(row[0]) // seq_len for row in x]


def test_windows_cover_each_window_once_per_epoch(tmp_path):
    T = 16
    tokens = make_stream(tmp_path, 16 * 50 + 5, shard=97)  # 50 windows, crossing shard boundaries
    w = TokenWindows(tmp_path, T, seed=7)
    assert w.num_windows == 50
    seen = []
    for _ in range(12):  # 12 batches of 4 = 48 windows; 2 left over, then the epoch rolls over
        x, y = w.next_batch(4)
        assert x.shape == y.shape == (4, T) and x.dtype == y.dtype == torch.int64
        for row_x, row_y in zip(x, y):
            s = int(row_x[0]) // T * T
            assert row_x.tolist() == tokens[s:s + T].tolist() and row_y.tolist() == tokens[s + 1:s + T + 1].tolist()
        seen += window_ids(x, T)
    assert len(set(seen)) == 48 and w.state_dict() == {"epoch": 0, "pos": 48, "seed": 7, "num_windows": 50}
    x, _ = w.next_batch(4)
    assert w.state_dict()["epoch"] == 1 and w.state_dict()["pos"] == 4
    assert window_ids(x, T) == w.permutation(1)[:4].tolist() != w.permutation(0)[:4].tolist()


def test_same_seed_same_order_other_seed_other_order(tmp_path):
    make_stream(tmp_path, 16 * 40 + 1)
    a, b, c = (TokenWindows(tmp_path, 16, seed=s) for s in (1, 1, 2))
    xa, xb, xc = (torch.cat([w.next_batch(5)[0] for _ in range(6)]) for w in (a, b, c))
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)


def test_ranks_are_disjoint_and_union_is_the_single_process_batch(tmp_path):
    make_stream(tmp_path, 16 * 64 + 1)
    single = TokenWindows(tmp_path, 16, seed=3)
    ranks = [TokenWindows(tmp_path, 16, seed=3, rank=r, world_size=4) for r in range(4)]
    for _ in range(9):  # crosses an epoch boundary (64 windows, 8 per global batch)
        whole, _ = single.next_batch(8)
        parts = [w.next_batch(2)[0] for w in ranks]
        ids = [set(window_ids(p, 16)) for p in parts]
        assert all(not (ids[i] & ids[j]) for i in range(4) for j in range(i + 1, 4))
        assert torch.equal(torch.cat(parts), whole)
    assert all(w.state_dict() == single.state_dict() for w in ranks)


def test_resume_continues_the_identical_sequence(tmp_path):
    make_stream(tmp_path, 16 * 30 + 1)
    ref = TokenWindows(tmp_path, 16, seed=11)
    expected = [ref.next_batch(4)[0] for _ in range(20)]  # several epochs
    w = TokenWindows(tmp_path, 16, seed=11)
    got = [w.next_batch(4)[0] for _ in range(9)]
    state = json.loads(json.dumps(w.state_dict()))  # survives a JSON / torch.save round trip
    resumed = TokenWindows(tmp_path, 16, seed=999)  # the saved seed wins
    resumed.load_state_dict(state)
    got += [resumed.next_batch(4)[0] for _ in range(11)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_world_size_change_keeps_the_global_order(tmp_path):
    make_stream(tmp_path, 16 * 40 + 1)
    two = [TokenWindows(tmp_path, 16, seed=5, rank=r, world_size=2) for r in range(2)]
    first = [torch.cat([w.next_batch(3)[0] for w in two]) for _ in range(4)]
    one = TokenWindows(tmp_path, 16, seed=5)
    one.load_state_dict(two[0].state_dict())  # resume the 2-GPU run on 1 GPU with double batch
    ref = [torch.cat([w.next_batch(3)[0] for w in two]) for _ in range(8)]
    assert all(torch.equal(one.next_batch(6)[0], r) for r in ref)
    fresh = TokenWindows(tmp_path, 16, seed=5)
    assert all(torch.equal(fresh.next_batch(6)[0], f) for f in first)


def test_too_short_split_and_changed_data_are_clear_errors(tmp_path):
    make_stream(tmp_path / "short", 16)
    with pytest.raises(UserError, match=r"holds 16 tokens, fewer than one window of seq_len\+1 = 17: "
                                        r"lower train.seq_len or add data"):
        TokenWindows(tmp_path / "short", 16, seed=0)
    make_stream(tmp_path / "small", 16 * 5 + 1)
    w = TokenWindows(tmp_path / "small", 16, seed=0, world_size=2)
    with pytest.raises(UserError, match=r"has 5 windows of 17 tokens, fewer than one global batch \(2 x 3\)"):
        w.next_batch(3)
    with pytest.raises(UserError, match=r"the training tokens changed since this state was saved"):
        w.load_state_dict({"epoch": 0, "pos": 0, "seed": 0, "num_windows": 6})


def test_eval_windows_score_every_token_once_in_order(tmp_path):
    tokens = make_stream(tmp_path, 16 * 10 + 7, shard=33)
    batches = list(eval_windows(tmp_path, 16, 4))
    assert [x.shape[0] for x, _ in batches] == [4, 4, 3]
    ys = torch.cat([y for _, y in batches]).flatten()
    assert ys[ys >= 0].tolist() == tokens[1:].tolist() and (ys[ys < 0] == -1).all()
    x_last, y_last = batches[-1]
    assert x_last[-1, :6].tolist() == tokens[-7:-1].tolist() and (x_last[-1, 6:] == 0).all()
    assert (y_last[-1, 6:] == -1).all()
    assert [torch.equal(a[0], b[0]) for a, b in zip(batches, eval_windows(tmp_path, 16, 4))] == [True] * 3
    capped = torch.cat([y for _, y in eval_windows(tmp_path, 16, 4, max_tokens=40)]).flatten()
    assert capped[capped >= 0].tolist() == tokens[1:41].tolist()


def test_empty_val_split_tokenizes_and_the_loader_says_what_to_do(tmp_path):
    write_split(tmp_path / "data" / "train", TEXTS * 4)
    write_split(tmp_path / "data" / "val", [])
    cfg = load_config(None, ["model=tiny"])
    train_tokenizer(cfg, tmp_path / "data", tmp_path / "tokenizer")
    meta = run_tokenize(cfg, tmp_path / "data", tmp_path / "tokenizer", tmp_path / "tokens")
    assert meta["tokens"]["val"] == 0 and meta["tokens"]["train"] > 0
    with pytest.raises(UserError, match=r"too few to evaluate: add data or raise data.val_fraction"):
        next(eval_windows(tmp_path / "tokens" / "val", 16, 2))
    with pytest.raises(UserError, match=r"no tokenizer found"):
        run_tokenize(cfg, tmp_path / "data", tmp_path / "nothing", tmp_path / "tokens2")


def test_a_failed_tokenize_leaves_no_meta_and_no_partial_shard(run, tmp_path):
    root, _ = run
    data = tmp_path / "data"
    write_split(data / "train", TEXTS)
    (data / "val").mkdir()
    (data / "val" / "00000.jsonl").write_text('{"id": "ok", "text": "fine"}\n{"id": "bad", "text": 3}\n')
    out = tmp_path / "tokens"
    out.mkdir()
    (out / "meta.json").write_text("{}")  # from an earlier, complete run
    with pytest.raises(UserError, match=r"00000\.jsonl:2: 'text' is not a string: re-run `antimatter prepare`"):
        run_tokenize(load_config(None, ["model=tiny"]), data, root / "tokenizer", out)
    assert not (out / "meta.json").exists()
    assert list((out / "val").iterdir()) == []


def test_lone_surrogates_in_records_become_replacement_characters(run, tmp_path, capsys):
    root, _ = run
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "train" / "00000.jsonl").write_text('{"id": "a", "text": "ok \\ud83d\\ude00 pair"}\n'
                                                '{"id": "b", "text": "lone \\ud800 high"}\n')
    meta = run_tokenize(load_config(None, ["model=tiny"]), data, root / "tokenizer", tmp_path / "tokens")
    assert "00000.jsonl: 1 document(s) held lone surrogate code points" in capsys.readouterr().err
    tok = load_tokenizer(root)
    stream = TokenShards(tmp_path / "tokens" / "train").read(0, meta["tokens"]["train"]).tolist()
    assert tok.decode(stream) == "ok \U0001F600 pair<|endoftext|>lone \ufffd high<|endoftext|>"
    assert tok.encode("x\udcff") == tok.encode("x\ufffd") == tok.encode_batch(["x\udcff"])[0]
