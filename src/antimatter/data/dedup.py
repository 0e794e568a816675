"""Deduplication: exact (hash of normalised text) and near-duplicate (MinHash LSH with datasketch).

Workers compute, per surviving document, a 128-bit key of its normalised text (lower case, whitespace
runs collapsed) and a MinHash signature of its word n-gram shingles. The main process then walks all
documents in the canonical corpus order (source, file, position) and keeps the first of each group: an
exact key seen before is an exact duplicate; otherwise the LSH index is queried and a candidate whose
estimated Jaccard similarity reaches the threshold makes it a near-duplicate. Same input, same survivors,
whatever the number of workers. This runs across all sources and before the train/val split, so no
near-copy of a training document can land in val.
"""

from __future__ import annotations

import re

import numpy as np
import xxhash
from datasketch import LeanMinHash, MinHash, MinHashLSH

from antimatter.config import DedupConfig

SCHEME = "affine32"
MINHASH_SEED = 1
_WORD = re.compile(r"\w+")
_CHUNK = 16384  # shingles per MinHash update: bounds the (chunk x num_perm) temporary


def exact_key(text: str) -> bytes:
    """128-bit key of the normalised text: equal keys = same words in the same order, ignoring case/spacing."""
    return xxhash.xxh3_128_digest(" ".join(text.lower().split()).encode("utf-8", "replace"))


def _identity(x):
    return x


class Signer:
    """MinHash signatures of word n-gram shingles (one datasketch MinHash reused per process)."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.mh = MinHash(num_perm=cfg.num_perm, seed=MINHASH_SEED, hashfunc=_identity, scheme=SCHEME)

    def shingle_hashes(self, text: str) -> np.ndarray:
        """32-bit hashes of the word n-grams (a short text is one shingle of all its words)."""
        words = _WORD.findall(text.lower())
        if not words:
            return np.zeros(0, dtype=np.uint32)
        ids = np.fromiter(map(xxhash.xxh64_intdigest, map(str.encode, words)), dtype=np.uint64, count=len(words))
        n = min(self.cfg.shingle, len(ids))
        h = ids[: len(ids) - n + 1].copy()
        for k in range(1, n):
            h = h * np.uint64(0x100000001B3) + ids[k: len(ids) - n + 1 + k]
        return ((h >> np.uint64(32)) ^ h).astype(np.uint32)

    def signature(self, text: str) -> np.ndarray | None:
        shingles = self.shingle_hashes(text)
        if len(shingles) == 0:
            return None
        self.mh.clear()
        for i in range(0, len(shingles), _CHUNK):
            self.mh.update_batch(shingles[i: i + _CHUNK])
        return self.mh.hashvalues.astype(np.uint32, copy=True)


class Deduper:
    """Decides, in corpus order, whether each document is new, an exact or a near duplicate."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.seen: dict[bytes, str] = {}
        self.lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm) if cfg.near else None
        self.sigs: dict[str, LeanMinHash] = {}

    def check(self, key: str, exact: bytes, sig: np.ndarray | None) -> tuple[str | None, str | None]:
        """(None, None) to keep, else (reason, id of the kept document it duplicates)."""
        if self.cfg.exact:
            first = self.seen.get(exact)
            if first is not None:
                return "dedup.exact", first
            self.seen[exact] = key
        if self.lsh is None or sig is None:
            return None, None
        mh = LeanMinHash(seed=MINHASH_SEED, hashvalues=sig, scheme=SCHEME)
        for cand in sorted(self.lsh.query(mh)):
            if not self.cfg.verify or mh.jaccard(self.sigs[cand]) >= self.cfg.threshold:
                return "dedup.near", cand
        self.lsh.insert(key, mh, check_duplication=False)
        self.sigs[key] = mh
        return None, None
