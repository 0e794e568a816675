"""Token shards: encode prepared documents to binary shards, and read them back for training and eval.

Shard format (`tokens/{train,val}/NNNNN.bin`): a 64-byte little-endian header, then the token ids.

    offset  size  field
    0       8     magic b"AMTOKENS"
    8       4     version (uint32, 1)
    12      4     bytes per token (uint32: 2 = uint16, 4 = uint32)
    16      8     number of tokens (uint64)
    24      4     vocab size (uint32)
    28      4     end-of-text id (uint32)
    32      16    xxh3-128 digest of the token bytes (all zero: not recorded, written before checksums)
    48      16    zero padding

A file whose magic, version, dtype or length does not match is refused with a message naming it, so a
truncated or foreign file is never misread. Loaders (`TokenShards`) also check each shard once per process
before using it: its checksum (when recorded), so changed bytes are refused instead of trained on, and its
largest id against the vocabulary, so a damaged id is refused up front instead of failing mid-training.
`check_tokenizer` refuses tokens made by another tokenizer than the one a stage uses (meta.json records the
sha256 of the tokenizer that made them). The token stream of a split is its shards in name order;
every document is followed by the end-of-text id (`doc0 EOT doc1 EOT ...`); documents may continue from
one shard into the next.

Loader contract (shared with the trainer): the stream is cut into non-overlapping windows of seq_len+1
tokens at stride seq_len. `TokenWindows` walks a permutation of the window indices seeded by (seed, epoch)
with a GLOBAL position counting windows taken by all ranks together; each call takes the next
world_size*B windows and returns this rank's slice, so the data order per optimizer step is the same for
any number of processes and resume continues exactly where it stopped.
"""

from __future__ import annotations

import json
import os
import queue
import resource
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from tqdm import tqdm

from antimatter.data import SPLITS
from antimatter.data.records import count_input_bytes, iter_records, split_files, train_files
from antimatter.errors import UserError, shorten
from antimatter.provenance import provenance, sha256_file
from antimatter.tokenizer import load_tokenizer

MAGIC = b"AMTOKENS"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQII")
_TOKEN_DTYPES = {2: np.dtype(np.uint16), 4: np.dtype(np.uint32)}
CHECKSUM = "xxh3_128"  # of each shard's token bytes, in its header; fast enough to check every shard on load
_CHECKSUM_AT, _CHECKSUM_BYTES = 32, 16
_NO_CHECKSUM = bytes(_CHECKSUM_BYTES)
_SCAN_CHUNK = 1 << 24  # bytes read at a time when a shard is verified (a multiple of every token size)
FIX_SHARDS = "re-run `antimatter tokenize --force`"


class ShardError(UserError):
    """A token shard is damaged (truncated, changed or holding impossible ids); the message names it."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits in it (vocab <= 65,536), else uint32."""
    return _TOKEN_DTYPES[2] if vocab_size <= 2**16 else _TOKEN_DTYPES[4]


# ------------------------------------------------------------------------------------ shard files


def pack_header(num_tokens: int, dtype: np.dtype, vocab_size: int, eot_id: int, checksum: bytes = _NO_CHECKSUM
                ) -> bytes:
    head = _HEADER.pack(MAGIC, VERSION, dtype.itemsize, num_tokens, vocab_size, eot_id)
    head = head + b"\0" * (_CHECKSUM_AT - len(head)) + checksum
    return head + b"\0" * (HEADER_BYTES - len(head))


def read_header(path: Path) -> dict[str, Any]:
    """Parse and check a shard header against the file's size; UserError naming the file otherwise."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    fix = "re-run `antimatter tokenize`"
    if len(head) < HEADER_BYTES:
        raise ShardError(f"token shard {path} is truncated ({size} bytes, shorter than its header): {fix}")
    magic, version, itemsize, n, vocab, eot = _HEADER.unpack_from(head)
    if magic != MAGIC:
        raise ShardError(f"{path} is not an AntiMatter token shard (bad magic {magic[:8]!r}): "
                         f"remove it from the folder or {fix}")
    if version != VERSION:
        raise ShardError(f"token shard {path} has format version {version}, this antimatter reads "
                         f"version {VERSION}: {fix}")
    if itemsize not in _TOKEN_DTYPES:
        raise ShardError(f"token shard {path} has an unknown token size {itemsize}: {fix}")
    expected = HEADER_BYTES + n * itemsize
    if size != expected:
        raise ShardError(f"token shard {path} is truncated or corrupt: header says {n:,} tokens "
                         f"({expected:,} bytes), file has {size:,} bytes: {fix}")
    checksum = head[_CHECKSUM_AT:_CHECKSUM_AT + _CHECKSUM_BYTES]
    return {"num_tokens": n, "dtype": _TOKEN_DTYPES[itemsize], "vocab_size": vocab, "eot_id": eot,
            "checksum": None if checksum == _NO_CHECKSUM else checksum}


def open_shard(path: Path) -> np.ndarray:
    """The shard's tokens, memory-mapped (read-only) past the header."""
    h = read_header(path)
    if h["num_tokens"] == 0:
        return np.empty(0, dtype=h["dtype"])
    return np.memmap(path, dtype=h["dtype"], mode="r", offset=HEADER_BYTES, shape=(h["num_tokens"],))


def write_shard(path: Path, tokens: np.ndarray, vocab_size: int, eot_id: int) -> None:
    """Write one whole shard atomically (tests and tools; `run_tokenize` streams with TokenShardWriter)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    body = np.ascontiguousarray(tokens).tobytes()
    with open(tmp, "wb") as f:
        f.write(pack_header(len(tokens), tokens.dtype, vocab_size, eot_id, xxhash.xxh3_128_digest(body)))
        f.write(body)
    tmp.replace(path)


# ------------------------------------------------------------------------------------ verification

# (path, device, inode, size, mtime) -> largest id: each shard is read once per process
_verified: dict[tuple, int] = {}


def _scan_shard(path: Path, header: dict[str, Any]) -> tuple[bytes, int]:
    """(xxh3-128 digest, largest id) of a shard's token bytes, read in chunks (RAM stays at one chunk)."""
    h = xxhash.xxh3_128()
    top = 0
    dtype = header["dtype"]
    buf = bytearray(_SCAN_CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        while n := f.readinto(buf):
            h.update(view[:n])
            top = max(top, int(np.frombuffer(buf, dtype=dtype, count=n // dtype.itemsize).max()))
    return h.digest(), top


def verify_shard(path: Path, vocab_size: int | None = None) -> dict[str, Any]:
    """The shard's header, after checking its token bytes against the recorded checksum (shards written
    before checksums are not checked) and every id against the shard's vocabulary and `vocab_size` (the
    model's). The bytes are read once per shard and process; later calls only compare the largest id."""
    path = Path(path)
    h = read_header(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    top = _verified.get(key)
    if top is None:
        if h["num_tokens"] == 0:
            top = -1
        else:
            digest, top = _scan_shard(path, h)
            if h["checksum"] is not None and digest != h["checksum"]:
                raise ShardError(f"token shard {path} has changed since it was written (its {CHECKSUM} "
                                 f"checksum does not match its header): {FIX_SHARDS}")
        _verified[key] = top
    if top >= h["vocab_size"]:
        raise ShardError(f"token shard {path} holds token id {top}, but the vocabulary has {h['vocab_size']} "
                         f"ids (shard header): {FIX_SHARDS}")
    if vocab_size is not None and top >= vocab_size:
        raise ShardError(f"token shard {path} holds token id {top}, but the model's vocabulary has "
                         f"{vocab_size} ids: {FIX_SHARDS} with the run's tokenizer, or set "
                         f"model.vocab_size to at least {top + 1}")
    return h


def read_meta(tokens_dir: Path) -> dict[str, Any] | None:
    """The tokens' meta.json (None where there is none: shards made by hand); one line naming the file and the
    fix when it is damaged, where json's traceback would name neither."""
    path = Path(tokens_dir) / "meta.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{path} is damaged ({shorten(str(e))}): {FIX_SHARDS}") from None
    vocab = meta.get("vocab_size") if isinstance(meta, dict) else None
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise UserError(f"{path} is damaged (not an object with a vocab_size): {FIX_SHARDS}")
    return meta


def recorded_tokenizer(tokens_dir: Path) -> str | None:
    """The sha256 of the tokenizer that made the tokens, from meta.json; None where it records none."""
    meta = read_meta(tokens_dir)
    return (meta.get("tokenizer_sha256") if meta else None) or None


def check_tokenizer(tokens_dir: Path, tokenizer_file: Path, tokenizer_sha256: str | None = None) -> None:
    """Refuse tokens that another tokenizer made than `tokenizer_file` (training or scoring them with another
    gives wrong numbers, not an error). Tokens whose meta.json records no tokenizer are not checked."""
    recorded = recorded_tokenizer(tokens_dir)
    if recorded is None:
        return
    actual = tokenizer_sha256 or sha256_file(tokenizer_file)
    if actual != recorded:
        raise UserError(f"{tokenizer_file} is not the tokenizer that made the tokens in {tokens_dir} (sha256 "
                        f"{actual[:12]}, {Path(tokens_dir) / 'meta.json'} records {recorded[:12]}): "
                        f"{FIX_SHARDS} to remake them with this tokenizer, or put back the tokenizer "
                        f"that made them")


class TokenShardWriter:
    """Streams tokens into numbered shards (00000.bin, ...) of `shard_tokens` tokens each.

    A shard is written as NAME.tmp with a zero count; when it closes the real count is patched into the
    header, the file is fsynced and renamed, so a crash never leaves a valid-looking partial shard.
    """

    def __init__(self, out_dir: Path, dtype: np.dtype, shard_tokens: int, vocab_size: int, eot_id: int):
        self.out_dir, self.dtype, self.shard_tokens = Path(out_dir), np.dtype(dtype), shard_tokens
        self.vocab_size, self.eot_id = vocab_size, eot_id
        self.shards: list[dict[str, Any]] = []
        self._f: Any = None
        self._n = 0
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def _open(self) -> None:
        self._path = self.out_dir / f"{len(self.shards):05d}.bin"
        self._tmp = self._path.with_name(self._path.name + ".tmp")
        self._f = open(self._tmp, "wb")
        self._f.write(pack_header(0, self.dtype, self.vocab_size, self.eot_id))
        self._n = 0
        self._hash = xxhash.xxh3_128()

    def _close(self) -> None:
        self._f.seek(0)
        digest = self._hash.digest()
        self._f.write(pack_header(self._n, self.dtype, self.vocab_size, self.eot_id, digest))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None
        self._tmp.replace(self._path)
        self.shards.append({"file": self._path.name, "tokens": self._n, "checksum": digest.hex()})

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=self.dtype)
        while len(tokens):
            if self._f is None:
                self._open()
            take = min(len(tokens), self.shard_tokens - self._n)
            body = tokens[:take].tobytes()
            self._f.write(body)
            self._hash.update(body)
            self._n += take
            tokens = tokens[take:]
            if self._n == self.shard_tokens:
                self._close()

    def close(self) -> list[dict[str, Any]]:
        """Finish the open shard; a split with no tokens at all still gets one empty shard."""
        if self._f is None and not self.shards:
            self._open()
        if self._f is not None:
            self._close()
        return self.shards

    def __enter__(self) -> TokenShardWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        elif self._f is not None:
            self._f.close()
            self._tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ encode


def _read_batches(files: list[Path], batch_docs: int, batch_bytes: int, out: queue.Queue) -> None:
    """Reader thread: parse JSON Lines into batches of texts while the main thread encodes."""
    try:
        texts: list[str] = []
        nbytes = text_bytes = 0
        for path in files:
            for rec, line_bytes in iter_records(path):
                texts.append(rec["text"])
                nbytes += line_bytes
                text_bytes += len(rec["text"].encode("utf-8"))
                if len(texts) >= batch_docs or nbytes >= batch_bytes:
                    out.put((texts, nbytes, text_bytes))
                    texts, nbytes, text_bytes = [], 0, 0
        if texts:
            out.put((texts, nbytes, text_bytes))
        out.put(None)
    except BaseException as e:  # hand the error to the consumer, which re-raises it
        out.put(e)


def _tokenize_split(tok: Any, files: list[Path], writer: TokenShardWriter, batch_docs: int, batch_bytes: int,
                    bar: tqdm) -> dict[str, int]:
    """Encode every document of a split (EOT after each) into the writer; returns counts."""
    q: queue.Queue = queue.Queue(maxsize=3)
    reader = threading.Thread(target=_read_batches, args=(files, batch_docs, batch_bytes, q), daemon=True)
    reader.start()
    docs = text_bytes = tokens = 0
    eot = tok.eot_id
    while (item := q.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        texts, nbytes, nbytes_text = item
        flat: list[int] = []
        for ids in tok.encode_batch(texts):
            flat.extend(ids)
            flat.append(eot)
        writer.write(np.array(flat, dtype=writer.dtype))
        docs += len(texts)
        text_bytes += nbytes_text
        tokens += len(flat)
        bar.update(nbytes)
    reader.join()
    return {"docs": docs, "bytes": text_bytes, "tokens": tokens}


def run_tokenize(cfg: Any, data_dir: Path, tokenizer_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Encode `data_dir/{train,val}` into `out_dir/{train,val}/NNNNN.bin` and write `out_dir/meta.json`."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    tok = load_tokenizer(tokenizer_dir)
    files = {s: train_files(data_dir) if s == "train" else split_files(data_dir / s) for s in SPLITS}
    if cfg.tokenize.workers > 0 and "RAYON_NUM_THREADS" not in os.environ:
        os.environ["RAYON_NUM_THREADS"] = str(cfg.tokenize.workers)  # effective before the first encode
    dtype = token_dtype(tok.vocab_size)
    (out_dir / "meta.json").unlink(missing_ok=True)  # written last: its presence means the shards are complete
    t0, cpu0 = time.perf_counter(), time.process_time()
    splits: dict[str, Any] = {}
    for split in SPLITS:
        split_out = out_dir / split
        split_out.mkdir(parents=True, exist_ok=True)
        for stale in [*split_out.glob("*.bin"), *split_out.glob("*.tmp")]:
            stale.unlink()  # shards of an earlier run would otherwise join this stream
        total = count_input_bytes(files[split])
        ts = time.perf_counter()
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenize {split}", file=sys.stderr,
                  dynamic_ncols=True, mininterval=1.0) as bar, \
                TokenShardWriter(split_out, dtype, cfg.tokenize.shard_tokens, tok.vocab_size, tok.eot_id) as w:
            counts = _tokenize_split(tok, files[split], w, cfg.tokenize.batch_docs,
                                     cfg.tokenize.batch_bytes, bar)
        seconds = time.perf_counter() - ts
        splits[split] = {
            **counts, "bytes_per_token": round(counts["bytes"] / max(1, counts["tokens"]), 4),
            "seconds": round(seconds, 2), "mb_per_s": round(counts["bytes"] / 1e6 / max(seconds, 1e-9), 3),
            "shards": [{**s, "file": f"{split}/{s['file']}"} for s in w.shards],
        }
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    all_bytes = sum(s["bytes"] for s in splits.values())
    meta = {
        "format": "antimatter-tokens", "version": VERSION, "header_bytes": HEADER_BYTES,
        "dtype": dtype.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
        "eot_placement": "after each document", "tokenizer_sha256": sha256_file(tok.path),
        "shard_checksum": f"{CHECKSUM} of each shard's token bytes, in its header",
        "splits": splits, "tokens": {s: splits[s]["tokens"] for s in SPLITS},
        "seconds": round(seconds, 2), "mb_per_s": round(all_bytes / 1e6 / max(seconds, 1e-9), 3),
        "cpu_seconds": round(cpu_seconds, 2), "load_avg_1m": round(os.getloadavg()[0], 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "provenance": provenance(device="cpu"),
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    tr, va = splits["train"], splits["val"]
    print(f"tokenize: train {tr['tokens']:,} tokens ({tr['docs']:,} docs), val {va['tokens']:,} tokens "
          f"({va['docs']:,} docs), {tr['bytes_per_token']:.2f} bytes/token, {all_bytes / 1e6:.1f} MB in "
          f"{seconds:.1f}s ({meta['mb_per_s']:.2f} MB/s) -> {out_dir}", file=sys.stderr)
    if va["tokens"] == 0:
        print("tokenize: warning: the val split is empty; training cannot measure val loss", file=sys.stderr)
    return meta


# ------------------------------------------------------------------------------------------ loaders


class TokenShards:
    """All shards of one split as one read-only token stream (memory-mapped, nothing loaded up front).

    Every shard is verified on opening (`verify_shard`: checksum, ids below the vocabulary and below
    `vocab_size`, the model's, when given), so damage is refused before any of it is used."""

    def __init__(self, split_dir: Path, vocab_size: int | None = None):
        self.split_dir = Path(split_dir)
        self.files = sorted(self.split_dir.glob("*.bin")) if self.split_dir.is_dir() else []
        if not self.files:
            raise UserError(f"no token shards (*.bin) in {self.split_dir}: run `antimatter tokenize` first")
        for f in self.files:
            verify_shard(f, vocab_size)
        self.arrays = [open_shard(f) for f in self.files]
        dtypes = {a.dtype for a in self.arrays}
        if len(dtypes) > 1:
            raise ShardError(f"token shards in {self.split_dir} mix dtypes {sorted(d.name for d in dtypes)}: "
                             f"re-run `antimatter tokenize`")
        self.dtype = self.arrays[0].dtype
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])
        self.num_tokens = int(self.starts[-1])

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) as int64, crossing shard boundaries when needed."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside [0, {self.num_tokens})")
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < length:
            lo = start + done - int(self.starts[i])
            take = min(length - done, len(self.arrays[i]) - lo)
            out[done:done + take] = self.arrays[i][lo:lo + take]
            done += take
            i += 1
        return out


class TokenWindows:
    """Deterministic, resumable training batches (see the module docstring for the contract)."""

    def __init__(self, split_dir: Path, seq_len: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 vocab_size: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.tokens = TokenShards(split_dir, vocab_size)
        self.seq_len, self.seed, self.rank, self.world_size = seq_len, seed, rank, world_size
        self.num_windows = (self.tokens.num_tokens - 1) // seq_len
        if self.num_windows < 1:
            raise UserError(f"{self.tokens.split_dir} holds {self.tokens.num_tokens:,} tokens, fewer than one "
                            f"window of seq_len+1 = {seq_len + 1}: lower train.seq_len or add data")
        self.epoch = 0
        self.pos = 0
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        """The window order of an epoch: a function of (seed, epoch) only."""
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        return self._perm

    def next_windows(self, batch_size: int) -> np.ndarray:
        """Window indices of this rank's part of the next global batch; advances the global state."""
        g = self.world_size * batch_size
        if g > self.num_windows:
            raise UserError(f"{self.tokens.split_dir} has {self.num_windows:,} windows of {self.seq_len + 1} "
                            f"tokens, fewer than one global batch ({self.world_size} x {batch_size}): lower "
                            f"train.micro_batch_size or train.seq_len, or add data")
        if self.pos + g > self.num_windows:
            self.epoch += 1
            self.pos = 0
        perm = self.permutation(self.epoch)
        lo = self.pos + self.rank * batch_size
        idx = perm[lo:lo + batch_size]
        self.pos += g
        return idx

    def next_batch(self, batch_size: int) -> tuple[Any, Any]:
        """(x, y) int64 CPU tensors of shape (batch_size, seq_len); y is x shifted by one token."""
        import torch  # here: `antimatter tokenize` imports this module and never needs torch

        T = self.seq_len
        rows = np.stack([self.tokens.read(int(i) * T, T + 1) for i in self.next_windows(batch_size)])
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "num_windows": self.num_windows}

    def load_state_dict(self, d: dict[str, int]) -> None:
        """Continue from a saved state (any rank, any world size); the saved seed replaces the given one."""
        if int(d["num_windows"]) != self.num_windows:
            raise UserError(f"the training tokens changed since this state was saved ({d['num_windows']:,} "
                            f"windows then, {self.num_windows:,} now in {self.tokens.split_dir}): resume with "
                            f"the same tokens and train.seq_len, or train a new run (--name NEW)")
        self.epoch, self.pos, self.seed = int(d["epoch"]), int(d["pos"]), int(d["seed"])
        self._perm_epoch = -1


def eval_windows(split_dir: Path, seq_len: int, batch_size: int, max_tokens: int = 0,
                 vocab_size: int | None = None) -> Iterator[tuple[Any, Any]]:
    """Deterministic (x, y) int64 batches walking the split in order, each target token scored once.

    Windows of seq_len+1 tokens at stride seq_len, not overlapping. The last window is padded: x with the
    EOT id and y with -1 (ignored by the loss), so every token after the first is a target exactly once.
    `max_tokens` > 0 caps the number of targets (the first max_tokens). The last batch may be smaller.
    `vocab_size`: the model's, to refuse ids it has no embedding for (see `TokenShards`).
    """
    import torch  # here: `antimatter tokenize` imports this module and never needs torch

    shards = TokenShards(split_dir, vocab_size)
    n_targets = shards.num_tokens - 1
    if n_targets < 1:
        raise UserError(f"{shards.split_dir} holds {shards.num_tokens} tokens, too few to evaluate: "
                        f"add data or raise data.val_fraction, then re-run prepare and tokenize")
    if max_tokens > 0:
        n_targets = min(n_targets, max_tokens)
    pad = read_header(shards.files[0])["eot_id"]
    starts = range(0, n_targets, seq_len)
    for b in range(0, len(starts), batch_size):
        batch = starts[b:b + batch_size]
        x = torch.full((len(batch), seq_len), pad, dtype=torch.int64)
        y = torch.full((len(batch), seq_len), -1, dtype=torch.int64)
        for r, s in enumerate(batch):
            n = min(seq_len, n_targets - s)  # targets in this window
            w = torch.from_numpy(shards.read(s, n + 1))
            x[r, :n] = w[:-1]
            y[r, :n] = w[1:]
        yield x, y
