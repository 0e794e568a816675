"""Loss, perplexity and bits per byte of a model on token streams and on the user's own text files.

Scoring a sequence x[0..n-1] means predicting every x[i], i >= 1, from the tokens before it. Sequences
longer than the context are cut into sliding windows (`sliding_windows`): each window feeds at most
`seq_len` tokens and scores only the targets no earlier window scored, so every target is scored exactly
once. With step `stride` S and context L, every target after the first window sees at least L - S + 1
tokens of context (S = L gives exactly the non-overlapping windows of the training loop's val loss,
`tokens.eval_windows`; S = L/2 gives every later token at least L/2 + 1 tokens of context).

Bits per byte = total negative log-likelihood in bits / number of UTF-8 bytes of the scored text. The
byte count is exact and tokenizer-independent: with byte-level BPE every token stands for a fixed byte
string, so the bytes of the scored text are the sum of the byte lengths of the scored tokens (special tokens
such as <|endoftext|> count 0 bytes; their loss is still counted, as in training).
"""

from __future__ import annotations

import gzip
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zstandard
from tokenizers.pre_tokenizers import ByteLevel
from tqdm import tqdm

from antimatter.device import autocast, resolve_dtype
from antimatter.errors import UserError
from antimatter.model.accel import attention_backend
from antimatter.provenance import sha256_file

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".text", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
COMPRESSION_SUFFIXES = (".gz", ".zst")


@dataclass
class Score:
    """Sums over scored tokens; the ratios are derived so that scores add up across files and batches."""

    nll: float = 0.0  # total negative log-likelihood, nats
    tokens: int = 0  # scored target tokens
    bytes: int = 0  # UTF-8 bytes of the scored tokens
    correct: int = 0  # targets that were the model's top-1 prediction

    def add(self, other: Score) -> None:
        self.nll += other.nll
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.correct += other.correct

    @property
    def loss(self) -> float:
        return self.nll / max(1, self.tokens)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / max(1, self.bytes)

    def to_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "top1_accuracy": self.correct / max(1, self.tokens), "tokens": self.tokens,
                "bytes": self.bytes, "bytes_per_token": self.bytes / max(1, self.tokens), "nll_nats": self.nll}


# ----------------------------------------------------------------------------------------- windows


def sliding_windows(n: int, seq_len: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """Windows over a sequence of n tokens as (a, b, s): the model reads x[a:b] (at most seq_len tokens)
    and the targets x[s..b] are scored (s > a). Every target 1..n-1 is scored exactly once."""
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in 1..seq_len ({seq_len}), got {stride}")
    last = 0  # last target already scored
    while last < n - 1:
        end = seq_len if last == 0 else last + stride  # the window's nominal end; the last one is cut short
        b = min(end, n - 1)
        yield max(0, end - seq_len), b, last + 1
        last = b


def score_windows(run_cfg, block_size: int, ev) -> tuple[int, int]:
    """(seq_len, stride) of scoring: the run's training length (at most the model's context) and
    `eval.stride` (0: the same length, non-overlapping windows as the training loop's val loss)."""
    seq_len = min(run_cfg.seq_len, block_size)
    return seq_len, min(ev.stride or seq_len, seq_len)


def token_byte_lengths(tok, vocab_size: int = 0) -> np.ndarray:
    """UTF-8 byte length of each token id (0 for special tokens), at least `vocab_size` entries (a model's
    vocabulary may be larger than its tokenizer's). Byte-level BPE writes each byte as one character of a
    256-character alphabet, so a token's byte length is its string length; any other token is measured by
    decoding it alone."""
    alphabet = set(ByteLevel.alphabet())
    hf = tok.hf
    specials = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
    out = np.zeros(max(hf.get_vocab_size(with_added_tokens=True), tok.vocab_size), dtype=np.int64)
    for s, i in hf.get_vocab(with_added_tokens=True).items():
        if i in specials:
            continue
        if all(ch in alphabet for ch in s):
            out[i] = len(s)
        else:
            out[i] = len(hf.decode([i], skip_special_tokens=False).encode("utf-8"))
    return np.pad(out, (0, max(0, vocab_size - len(out))))


# ----------------------------------------------------------------------------------------- scoring


@torch.inference_mode()
def score_sequences(model, seqs: list[np.ndarray], seq_len: int, stride: int, byte_lens: np.ndarray, *,
                    batch_size: int = 8, dtype: str = "auto", desc: str = "scoring", progress: bool = True) -> Score:
    """Sum the next-token loss of every target (index >= 1) of every sequence, by sliding windows.
    Windows of all sequences are batched together (right-padded; padding targets are ignored). `progress`:
    a progress bar on stderr."""
    device = next(model.parameters()).device
    ctx = autocast(device, resolve_dtype(dtype, device, "eval.dtype"))
    jobs = [(k, a, b, s) for k, x in enumerate(seqs) for a, b, s in sliding_windows(len(x), seq_len, stride)]
    score = Score()
    lens_t = torch.as_tensor(byte_lens, device=device)
    n_targets = sum(max(0, len(x) - 1) for x in seqs)
    # the attention kernel training prefers (cuDNN on Hopper): the same function, faster there
    with attention_backend("auto"), tqdm(total=n_targets, desc=desc, unit="tok", unit_scale=True,
                                         leave=False, disable=not progress) as bar:
        for i in range(0, len(jobs), batch_size):
            batch = jobs[i: i + batch_size]
            width = max(b - a for _, a, b, _ in batch)
            idx = torch.zeros((len(batch), width), dtype=torch.long)
            tgt = torch.full((len(batch), width), -1, dtype=torch.long)
            for r, (k, a, b, s) in enumerate(batch):
                x = torch.from_numpy(np.asarray(seqs[k][a: b + 1], dtype=np.int64))
                idx[r, : b - a] = x[:-1]
                tgt[r, s - a - 1: b - a] = x[s - a:]  # target x[j] sits at input position j - a - 1
            idx, tgt = idx.to(device), tgt.to(device)
            with ctx:
                logits = model(idx)
            valid = tgt != -1
            nll = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=-1, reduction="sum")
            correct = ((logits.argmax(-1) == tgt) & valid).sum()
            n = int(valid.sum())
            score.add(Score(nll=float(nll), tokens=n, bytes=int(lens_t[tgt[valid]].sum()), correct=int(correct)))
            bar.update(n)
    return score


def unigram_score(train_counts: np.ndarray, seqs: list[np.ndarray], byte_lens: np.ndarray) -> Score:
    """The same targets scored by a unigram model: p(t) = (count_train(t) + 1) / (N_train + V), add-one
    smoothed over the tokenizer's vocabulary V. A model that learned nothing beyond token frequencies
    sits at this perplexity; a trained model should be far below it."""
    counts = train_counts.astype(np.float64)
    logp = np.log(counts + 1.0) - np.log(counts.sum() + len(counts))
    score = Score()
    for x in seqs:
        t = np.asarray(x[1:], dtype=np.int64)
        score.add(Score(nll=float(-logp[t].sum()), tokens=len(t), bytes=int(byte_lens[t].sum())))
    return score


# ------------------------------------------------------------------------------------- user files


def _strip_compression(name: str) -> tuple[str, str]:
    for c in COMPRESSION_SUFFIXES:
        if name.endswith(c):
            return name[: -len(c)], c
    return name, ""


def file_format(path: Path) -> str:
    """'text' or 'jsonl' from the file name (compression suffix .gz/.zst allowed), else a UserError."""
    base, _ = _strip_compression(path.name.lower())
    if base.endswith(TEXT_SUFFIXES):
        return "text"
    if base.endswith(JSONL_SUFFIXES):
        return "jsonl"
    raise UserError(f"unknown eval file format '{path.name}': give .txt, .md or .jsonl files "
                    f"(optionally compressed .gz or .zst)")


def _read_bytes(path: Path) -> bytes:
    _, comp = _strip_compression(path.name.lower())
    try:
        if comp == ".gz":
            return gzip.decompress(path.read_bytes())
        if comp == ".zst":
            with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as r:
                return io.BufferedReader(r).read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"cannot read eval file {path} ({e}): check that it is a complete {comp or 'text'} file") from None
    except Exception as e:  # zstandard raises its own error type
        raise UserError(f"cannot decompress eval file {path} ({e}): check that it is a complete {comp} file") from None


def read_documents(path: str | Path, text_field: str = "text") -> tuple[list[str], str]:
    """Documents of a user file: a text/markdown file is one document, a JSON Lines file one per record
    (its `text_field`). Returns (documents, format); bad input raises a one-line UserError."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"eval file {p} is a folder: give --data its files (e.g. {p}/*.txt)")
    if not p.is_file():
        raise UserError(f"eval file not found: {p}: check the path given to --data")
    fmt = file_format(p)
    raw = _read_bytes(p)
    if b"\x00" in raw[:65536]:
        raise UserError(f"eval file {p} looks binary (NUL bytes), not text: give a UTF-8 .txt, .md or .jsonl file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"eval file {p} is not UTF-8 text (bad byte at offset {e.start}): convert it to UTF-8 "
                        f"or give a .txt, .md or .jsonl file") from None
    if fmt == "text":
        docs = [text] if text.strip() else []
    else:
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"eval file {p} line {n} is not valid JSON: fix the line or give a text file") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                raise UserError(f"eval file {p} line {n} has no string field '{text_field}': "
                                f"set eval.text_field to the field that holds the text")
            if rec[text_field].strip():
                docs.append(rec[text_field])
    if not docs:
        raise UserError(f"eval file {p} is empty (no text to score): give a file with some text")
    return docs, fmt


def score_documents(model, tok, docs: list[str], seq_len: int, stride: int, byte_lens: np.ndarray, *,
                    batch_size: int = 8, dtype: str = "auto", desc: str = "scoring", progress: bool = True) -> Score:
    """The summed score of documents, each read as <|endoftext|> + its tokens (the way documents follow each
    other in training), so its first token is scored too."""
    seqs = [np.asarray([tok.eot_id, *ids], dtype=np.int64) for ids in tok.encode_batch(docs)]
    return score_sequences(model, seqs, seq_len, stride, byte_lens, batch_size=batch_size, dtype=dtype, desc=desc,
                           progress=progress)


def score_files(model, tok, paths: list[str], seq_len: int, stride: int, byte_lens: np.ndarray, *,
                batch_size: int = 8, dtype: str = "auto", text_field: str = "text") -> list[dict]:
    """Score each file's documents separately (`score_documents`)."""
    results = []
    for path in paths:
        docs, fmt = read_documents(path, text_field)
        score = score_documents(model, tok, docs, seq_len, stride, byte_lens, batch_size=batch_size, dtype=dtype,
                                desc=Path(path).name)
        text_bytes = sum(len(d.encode("utf-8")) for d in docs)
        results.append({"path": str(path), "sha256": sha256_file(path), "format": fmt, "documents": len(docs),
                        "text_bytes": text_bytes, **score.to_dict()})
    return results


def score_by_source(model, tok, docs: list[tuple[str, str]], seq_len: int, stride: int, byte_lens: np.ndarray, *,
                    max_tokens: int = 0, batch_size: int = 8, dtype: str = "auto") -> dict[str, dict]:
    """Loss / perplexity / bits per byte of (source, text) documents, per source. Each document is read as
    <|endoftext|> + its tokens. With `max_tokens`, every source gets an equal share of the budget (documents
    in their order), so one large source cannot crowd out the others."""
    by_source: dict[str, list[str]] = {}
    for source, text in docs:
        by_source.setdefault(source, []).append(text)
    share = max_tokens // max(1, len(by_source)) if max_tokens > 0 else 0
    out = {}
    for source in sorted(by_source):
        seqs, total = [], 0
        for ids in tok.encode_batch(by_source[source]):
            if share and total >= share:
                break
            seq = np.asarray([tok.eot_id, *ids], dtype=np.int64)
            if share:
                seq = seq[: share - total + 1]
            seqs.append(seq)
            total += len(seq) - 1
        score = score_sequences(model, seqs, seq_len, stride, byte_lens, batch_size=batch_size, dtype=dtype,
                                desc=f"val {source}")
        out[source] = {"documents": len(seqs), **score.to_dict()}
    return out
