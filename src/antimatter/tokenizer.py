"""Byte-level BPE tokenizer: train on a bounded sample of the train split, save, load.

The tokenizer is GPT-2's recipe built with Hugging Face `tokenizers`: text is split with GPT-2's regex,
mapped to 256 byte symbols (so every string is representable and round-trips exactly, no unknown token),
and merges are learned with BPE. `<|endoftext|>` is the first special token and always gets id 0, whatever
the vocab size, so the end-of-text id is stable (`EOT_ID`); extra `tokenizer.special_tokens` follow it.

Merges are learned on a deterministic sample of the train split bounded by `tokenizer.train_bytes`
(BPE training memory grows with the corpus): each document is kept when a hash of its id falls below the
sampling rate budget/total, so the sample spreads over every source instead of taking the first files.

Files written to the tokenizer folder: `tokenizer.json` (loads in `tokenizers.Tokenizer.from_file` and in
`transformers.PreTrainedTokenizerFast(tokenizer_file=...)`) plus `tokenizer_config.json` and
`special_tokens_map.json`, so the folder also loads with `AutoTokenizer.from_pretrained(folder)`.
`write_hf_tokenizer_files(src, dst)` writes the same three files into an export folder.

`tokenizer.from: PATH` adopts an existing tokenizer instead (`adopt_tokenizer`): the tokenizer.json is copied
byte for byte (so a model exported with it, used as `train.init_from`, is recognised as the run's) and the two
transformers files are written beside it. It must be a byte-level BPE with an end-of-text token, like ours.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from antimatter.config import EOT
from antimatter.data.records import count_input_bytes, iter_records, train_files, valid_unicode
from antimatter.errors import UserError, shorten

EOT_ID = 0  # special tokens come first in the vocab; EOT is always the first of them
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

CHUNK_CHARS = 32_768  # long documents are encoded in pieces of about this size (identical ids)


def safe_cuts(text: str, chunk_chars: int) -> list[int]:
    """Positions about every `chunk_chars` where cutting the text cannot change its tokens.

    A cut at p where text[p-1] is a newline and text[p-2], text[p] are not whitespace falls between two
    pieces of GPT-2's pre-split regex whether or not the text is cut there (a lone newline is its own
    piece; the pattern has no look-behind), and BPE never merges across pieces. Python's isspace() is a superset of
    the regex's whitespace class, so the check errs on the safe side.
    """
    cuts: list[int] = []
    n = len(text)
    pos = chunk_chars
    while pos < n:
        i = text.find("\n", pos)
        while i != -1 and not (0 < i < n - 1 and not text[i - 1].isspace() and not text[i + 1].isspace()):
            i = text.find("\n", i + 1)
        if i == -1:
            break
        cuts.append(i + 1)
        pos = i + 1 + chunk_chars
    return cuts


class Tokenizer:
    """Thin wrapper that fixes the conventions every stage relies on.

    `encode` treats its input as plain text: a literal "<|endoftext|>" inside a document is encoded as
    ordinary bytes and never becomes the EOT id, so data cannot inject document boundaries. `decode`
    keeps special tokens, so `decode(encode(s)) == s` for every string `s`.
    """

    def __init__(self, hf: HFTokenizer, path: Path | None = None, eot_token: str = EOT):
        self.hf = hf
        self.path = path
        eot = hf.token_to_id(eot_token)
        if eot is None:
            raise UserError(f"tokenizer {path} has no {eot_token} token: retrain it with `antimatter tokenizer`")
        self.eot_token = eot_token
        self.eot_id: int = eot
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)
        hf.encode_special_tokens = True  # in-memory only: never serialised into tokenizer.json

    def encode(self, text: str) -> list[int]:
        try:
            return self.hf.encode(text, add_special_tokens=False).ids
        except TypeError:  # lone surrogates cannot cross into Rust
            return self.hf.encode(valid_unicode(text), add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], chunk_chars: int = CHUNK_CHARS) -> list[list[int]]:
        """Encode many documents in parallel (Rust threads, GIL released); same ids as `encode`.

        Threads share out whole inputs, so one long book would keep one core busy while the other idles:
        documents longer than `chunk_chars` are cut at points where GPT-2's pre-split always cuts
        (see `safe_cuts`), encoded as separate pieces and joined again.
        """
        pieces: list[str] = []
        owners: list[int] = []
        for i, text in enumerate(texts):
            lo = 0
            for cut in safe_cuts(text, chunk_chars) if len(text) > chunk_chars else ():
                pieces.append(text[lo:cut])
                owners.append(i)
                lo = cut
            pieces.append(text[lo:])
            owners.append(i)
        fast = getattr(self.hf, "encode_batch_fast", None)  # no offsets: faster (tokenizers >= 0.20)
        try:
            encs = (fast or self.hf.encode_batch)(pieces, add_special_tokens=False)
        except TypeError:  # lone surrogates cannot cross into Rust
            encs = (fast or self.hf.encode_batch)([valid_unicode(p) for p in pieces], add_special_tokens=False)
        if len(pieces) == len(texts):
            return [e.ids for e in encs]
        out: list[list[int]] = [[] for _ in texts]
        for owner, enc in zip(owners, encs):
            out[owner].extend(enc.ids)
        return out

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(i)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id}, path={self.path})"


# ------------------------------------------------------------------------------------------ sampling


def _hash_fraction(doc_id: str) -> float:
    """A uniform number in [0, 1) that depends only on the document id."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little") / 2**64


def sample_texts(files: list[Path], budget_bytes: int, stats: dict[str, Any]) -> Iterator[list[str]]:
    """Batches of documents of a deterministic sample of at most `budget_bytes` UTF-8 bytes.

    Documents are kept when their id hash falls below budget/total; a document that would overflow the
    budget is skipped (never cut). Fills `stats` (docs/bytes seen and used) as it goes.
    """
    total = count_input_bytes(files)
    rate = 1.0 if budget_bytes <= 0 or budget_bytes >= total else budget_bytes / total
    stats.update(docs_total=0, bytes_total=0, docs_used=0, bytes_used=0, sample_rate=round(rate, 6))
    batch: list[str] = []
    for path in files:
        for rec, _ in iter_records(path):
            text, doc_id = rec["text"], str(rec["id"])
            n = len(text.encode("utf-8"))
            stats["docs_total"] += 1
            stats["bytes_total"] += n
            if rate < 1.0 and _hash_fraction(doc_id) >= rate:
                continue
            if budget_bytes > 0 and stats["bytes_used"] + n > budget_bytes:
                continue
            stats["docs_used"] += 1
            stats["bytes_used"] += n
            batch.append(text)
            if len(batch) >= 256:
                yield batch
                batch = []
    if batch:
        yield batch


# ------------------------------------------------------------------------------------------ training


def new_byte_level_bpe() -> HFTokenizer:
    """An empty GPT-2 style byte-level BPE (regex pre-split, byte alphabet, no normaliser: exact bytes)."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def short_vocab_note(cfg: Any, reached: int, asked: int, stats: dict[str, Any]) -> str:
    """Why BPE stopped before `asked` tokens, and what would fix it. The trainer stops when no pair of
    tokens occurs min_frequency times in the sample any more: the text is too small for that many merges."""
    source = "tokenizer.vocab_size" if cfg.tokenizer.vocab_size else "model.vocab_size (tokenizer.vocab_size unset)"
    used, total = stats.get("bytes_used", 0), stats.get("bytes_total", 0)

    def size(n: int) -> str:
        return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n:,} bytes"

    more = (f"raise tokenizer.train_bytes (the sample used {size(used)} of {size(total)})" if used < total
            else "add text")
    return (f"learned {reached:,} of the {asked:,} tokens asked by {source}: the {size(used)} of training "
            f"text has no more pairs seen {cfg.tokenizer.min_frequency}+ times, too small for that many "
            f"merges; {more}, or ask for tokenizer.vocab_size={reached}. The model keeps vocab "
            f"{cfg.model.vocab_size:,} (the unused rows are never trained)")


def train_tokenizer(cfg: Any, data_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Learn merges on a bounded sample of `data_dir/train`, write `out_dir/tokenizer.json` (+ HF files)."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    files = train_files(data_dir)
    vocab_size = cfg.tokenizer_vocab_size
    specials = [EOT] + [s for s in cfg.tokenizer.special_tokens if s != EOT]
    t0 = time.perf_counter()
    tok = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=cfg.tokenizer.min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=sys.stderr.isatty())
    stats: dict[str, Any] = {}
    tok.train_from_iterator(sample_texts(files, cfg.tokenizer.train_bytes, stats), trainer=trainer)
    if stats["bytes_used"] == 0:
        raise UserError(f"the train split in {data_dir / 'train'} has no text to learn a tokenizer from: "
                        f"add data or raise tokenizer.train_bytes")
    seconds = time.perf_counter() - t0
    assert tok.token_to_id(EOT) == EOT_ID, "special tokens must come first in the vocab"

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "tokenizer.json.tmp"
    tok.save(str(tmp))
    tmp.replace(out_dir / "tokenizer.json")
    write_hf_tokenizer_files(out_dir / "tokenizer.json", out_dir, model_max_length=cfg.model.block_size)
    wrapped = load_tokenizer(out_dir)
    summary = {
        "vocab_size": wrapped.vocab_size, "requested_vocab_size": vocab_size,
        "eot_token": EOT, "eot_id": wrapped.eot_id, "special_tokens": specials,
        "num_merges": len(json.loads((out_dir / "tokenizer.json").read_text("utf-8"))["model"]["merges"]),
        "min_frequency": cfg.tokenizer.min_frequency, "train_bytes_budget": cfg.tokenizer.train_bytes,
        **stats, "seconds": round(seconds, 2), "files": list(HF_FILES),
    }
    if wrapped.vocab_size < vocab_size:
        summary["note"] = short_vocab_note(cfg, wrapped.vocab_size, vocab_size, stats)
        print(f"tokenizer: note: {summary['note']}", file=sys.stderr)
    print(f"tokenizer: vocab {wrapped.vocab_size:,} (eot id {wrapped.eot_id}) learned from "
          f"{stats['docs_used']:,}/{stats['docs_total']:,} docs, {stats['bytes_used'] / 1e6:.1f}/"
          f"{stats['bytes_total'] / 1e6:.1f} MB in {seconds:.1f}s -> {out_dir / 'tokenizer.json'}",
          file=sys.stderr)
    return summary


# ---------------------------------------------------------------------------------- loading, export


def resolve_tokenizer_file(path: Path) -> Path:
    """tokenizer.json itself, a folder holding it, or a run folder (RUN/tokenizer/tokenizer.json)."""
    path = Path(path)
    for candidate in (path, path / "tokenizer.json", path / "tokenizer" / "tokenizer.json"):
        if candidate.is_file():
            return candidate
    raise UserError(f"no tokenizer found at {path} (looked for tokenizer.json and tokenizer/tokenizer.json): "
                    f"run `antimatter tokenizer` first or pass the right path")


def load_tokenizer(path: Path) -> Tokenizer:
    """Load the run's tokenizer from tokenizer.json, its folder, or a run folder.

    The end-of-text token is `<|endoftext|>`; a foreign tokenizer without it (a run made by
    `antimatter import` from, say, a Llama folder) uses the `eos_token` of the tokenizer_config.json
    next to it.
    """
    file = resolve_tokenizer_file(path)
    try:
        hf = HFTokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a bare Exception on malformed files
        raise unreadable_tokenizer(file, e) from None
    eot = _end_of_text(hf, file)
    if eot is None:
        raise UserError(f"tokenizer {file} has no {EOT} token and no eos_token in a tokenizer_config.json "
                        f"beside it: retrain it with `antimatter tokenizer` or add the eos_token")
    return Tokenizer(hf, file, eot)


def unreadable_tokenizer(file: Path, error: Exception) -> UserError:
    """The one-line error for a tokenizer.json the tokenizers library refuses. Retraining is the fix only
    before a model was trained with it: a run's checkpoints need that very tokenizer back."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
    checkpoints = Path(file).parent.parent / "checkpoints"
    if Path(file).parent.name == "tokenizer" and any(checkpoints.glob("step_*")):
        fix = ("this run's checkpoints were trained with it, so restore it from a copy (an `antimatter export` "
               "of the run holds one); a retrained tokenizer would not fit them")
    else:
        fix = "retrain it with `antimatter tokenizer`"
    return UserError(f"{file} is not a valid tokenizers file ({reason}): {fix}")


def _end_of_text(hf: HFTokenizer, file: Path) -> str | None:
    """`<|endoftext|>` if the vocabulary has it, else the eos_token a tokenizer_config.json beside the file
    names (foreign tokenizers), else None."""
    if hf.token_to_id(EOT) is not None:
        return EOT
    eos = _configured_eos(file.with_name("tokenizer_config.json"))
    return eos if eos is not None and hf.token_to_id(eos) is not None else None


# ------------------------------------------------------------------------------------- adopting one


def tokenizer_source(path: str | Path) -> Path:
    """The tokenizer.json that `tokenizer.from` names: the file itself, a (Hugging Face) folder holding it, or
    a run folder (RUN/tokenizer/tokenizer.json). A missing path or a folder without one is one line."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"tokenizer.from: {path} does not exist: give a tokenizer.json, a Hugging Face folder "
                        f"holding one, or a run folder")
    if not path.is_dir():
        return path
    for candidate in (path / "tokenizer.json", path / "tokenizer" / "tokenizer.json"):
        if candidate.is_file():
            return candidate
    raise UserError(f"tokenizer.from: {path} is a folder without tokenizer.json (nor tokenizer/tokenizer.json): "
                    f"give a Hugging Face folder with a fast tokenizer, a run folder, or the file itself")


def _has_byte_level(component: Any) -> bool:
    """A pre-tokenizer or decoder that is ByteLevel or a Sequence holding one."""
    if not isinstance(component, dict):
        return False
    if component.get("type") == "ByteLevel":
        return True
    parts = component.get("pretokenizers") or component.get("decoders") or []
    return isinstance(parts, list) and any(_has_byte_level(p) for p in parts)


def check_adoptable(file: Path) -> Tokenizer:
    """`file` loaded as the run's tokenizer, or one line naming what it lacks: readable JSON of the tokenizers
    library, a BPE model, ByteLevel pre-tokenizer and decoder (every byte representable, exact decoding),
    and an end-of-text token (`<|endoftext|>`, or the eos_token of a tokenizer_config.json beside it)."""
    file = Path(file)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"tokenizer.from: cannot read {file} ({e.strerror or e}): check the path and its "
                        f"permissions") from None
    except UnicodeDecodeError:
        raise UserError(f"tokenizer.from: {file} is not a tokenizer.json (not UTF-8 text)") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        where = f" at line {e.lineno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else ""
        raise UserError(f"tokenizer.from: {file} is not a tokenizer.json (invalid JSON{where})") from None
    model = data.get("model") if isinstance(data, dict) else None
    kind = model.get("type") if isinstance(model, dict) else None
    if kind != "BPE":
        raise UserError(f"tokenizer.from: {file} has no BPE model (model.type is {shorten(repr(kind))}): "
                        f"AntiMatter uses byte-level BPE tokenizers (GPT-2, Llama 3, Qwen style)")
    for part in ("pre_tokenizer", "decoder"):
        if not _has_byte_level(data.get(part)):
            raise UserError(f"tokenizer.from: {file} has no ByteLevel {part.replace('_', '-')}: not a "
                            f"byte-level BPE (a SentencePiece-style BPE such as Llama 2's is not supported)")
    try:
        hf = HFTokenizer.from_str(text)
    except Exception as e:  # the Rust side raises a bare Exception on malformed files
        raise UserError(f"tokenizer.from: {file} is not a valid tokenizers file "
                        f"({str(e).splitlines()[0][:120]})") from None
    eot = _end_of_text(hf, file)
    if eot is None:
        raise UserError(f"tokenizer.from: {file} has no end-of-text token: neither {EOT} nor an eos_token "
                        f"named in a tokenizer_config.json beside it")
    return Tokenizer(hf, file, eot)


def adopt_tokenizer(cfg: Any, out_dir: Path) -> dict[str, Any]:
    """`tokenizer.from`: copy that tokenizer.json into `out_dir` (+ the transformers files) instead of learning
    one. Refused in one line when it is not usable (see `check_adoptable`) or has more ids than the model."""
    out_dir = Path(out_dir)
    src = tokenizer_source(cfg.tokenizer.from_)
    tok = check_adoptable(src)
    if tok.vocab_size > cfg.model.vocab_size:
        raise UserError(f"tokenizer.from: {src} has {tok.vocab_size:,} tokens but model.vocab_size is "
                        f"{cfg.model.vocab_size:,}: set model.vocab_size={tok.vocab_size} (or the size of the "
                        f"model made with this tokenizer)")
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "tokenizer.json.tmp"
    shutil.copyfile(src, tmp)
    tmp.replace(out_dir / "tokenizer.json")
    for name, content in hf_tokenizer_config(tok.eot_id, cfg.model.block_size, tok.eot_token).items():
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    print(f"tokenizer: adopted {src} (vocab {tok.vocab_size:,}, eot {tok.eot_token} id {tok.eot_id}, sha256 "
          f"{sha[:12]}) -> {out_dir / 'tokenizer.json'}", file=sys.stderr)
    return {"source": str(src.resolve()), "sha256": sha, "vocab_size": tok.vocab_size,
            "eot_token": tok.eot_token, "eot_id": tok.eot_id, "files": list(HF_FILES)}


def _configured_eos(config_file: Path) -> str | None:
    try:
        eos = json.loads(config_file.read_text(encoding="utf-8")).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(eos, dict):  # older transformers wrote {"content": "</s>", ...}
        eos = eos.get("content")
    return eos if isinstance(eos, str) and eos else None


def hf_tokenizer_config(eot_id: int = EOT_ID, model_max_length: int = 1024, eot_token: str = EOT
                        ) -> dict[str, dict[str, Any]]:
    """Contents of tokenizer_config.json and special_tokens_map.json for transformers.

    EOT doubles as bos/eos/unk/pad like GPT-2; no clean-up of spaces so decoding is exact.
    """
    special = {"bos_token": eot_token, "eos_token": eot_token, "unk_token": eot_token, "pad_token": eot_token}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False, "add_prefix_space": False,
        "added_tokens_decoder": {str(eot_id): {"content": eot_token, "lstrip": False, "normalized": False,
                                               "rstrip": False, "single_word": False, "special": True}},
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def write_hf_tokenizer_files(tokenizer_path: Path, out_dir: Path, model_max_length: int = 1024) -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`.

    `tokenizer_path` is anything `load_tokenizer` accepts; export calls this with the run folder and the
    Hugging Face folder it builds.
    """
    src = resolve_tokenizer_file(tokenizer_path)
    tok = load_tokenizer(src)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / "tokenizer.json"
    if src.resolve() != dst.resolve():
        shutil.copyfile(src, dst)
    written = [dst]
    for name, content in hf_tokenizer_config(tok.eot_id, model_max_length, tok.eot_token).items():
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        written.append(out_dir / name)
    return written
