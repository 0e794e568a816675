"""Byte-level BPE: training on a bounded sample, exact round trips, transformers loading, clear errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import zstandard

from antimatter.config import load_config
from antimatter.errors import UserError
from antimatter.tokenizer import (
    EOT,
    EOT_ID,
    adopt_tokenizer,
    load_tokenizer,
    new_byte_level_bpe,
    train_tokenizer,
    write_hf_tokenizer_files,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times.",
    "def add(a, b):\n    \"\"\"Return the sum.\"\"\"\n    return a + b\n\nprint(add(2, 3))\n",
    "#include <stdio.h>\nint main(void) { printf(\"hello, world\\n\"); return 0; }\n",
    "Größe, naïve café, façade; Ελληνικά; русский текст; 日本語のテキスト; 中文文本; 한국어 🙂🚀👍🏽",
    "apple: a round fruit of a tree of the rose family.\nbanana: a long curved fruit.\n",
]


def write_split(path: Path, texts: list[str], prefix: str = "doc") -> None:
    path.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": f"{prefix}/{i}", "source": "test", "text": t}) for i, t in enumerate(texts)]
    (path / "00000.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))


def make_corpus(root: Path, n_docs: int = 200) -> Path:
    """A prepared-like data folder: data/{train,val}/00000.jsonl.zst with varied documents."""
    rng = random.Random(0)
    docs = [f"{rng.choice(TEXTS)} ({i}) " + " ".join(rng.choice(TEXTS).split()[: 3 + i % 17]) for i in range(n_docs)]
    write_split(root / "data" / "train", docs)
    write_split(root / "data" / "val", docs[:10], "val")
    return root / "data"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("tokrun")
    data = make_corpus(root)
    cfg = load_config(None, ["model=tiny"])
    return root, train_tokenizer(cfg, data, root / "tokenizer")


def random_text(rng: random.Random, n: int) -> str:
    """Random Unicode from many blocks: ASCII, controls, Latin, combining marks, CJK, emoji, astral, NUL."""
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0x7F, 0x9F), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF),
              (0x400, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x9FFF),
              (0xAC00, 0xD7A3), (0xE000, 0xF8FF), (0xFE00, 0xFE0F), (0xFFF0, 0xFFFD), (0x1F300, 0x1FAFF),
              (0x20000, 0x2A6DF), (0xE0000, 0xE007F), (0x10FF00, 0x10FFFF), (0x200B, 0x200F)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
        if rng.random() < 0.15:
            out.append(rng.choice([" ", "  ", "\n", "\t", "\r\n", " '", "'s ", "123", EOT]))
    return "".join(out)


def test_train_reports_vocab_eot_and_sample(trained):
    root, info = trained
    assert (root / "tokenizer" / "tokenizer.json").is_file()
    assert info["eot_id"] == EOT_ID == 0 and info["eot_token"] == EOT
    assert 256 < info["vocab_size"] <= 512 and info["requested_vocab_size"] == 512
    assert info["docs_used"] == info["docs_total"] == 200  # budget (200 MB) exceeds the corpus
    assert info["bytes_used"] == info["bytes_total"] > 0
    tok = load_tokenizer(root)
    assert tok.vocab_size == info["vocab_size"] and tok.eot_id == 0 and tok.id_to_token(0) == EOT
    from tokenizers.pre_tokenizers import ByteLevel

    assert set(ByteLevel.alphabet()) <= set(tok.hf.get_vocab())  # every byte, even those unseen in training


def test_round_trip_any_unicode(trained):
    tok = load_tokenizer(trained[0])
    rng = random.Random(1234)
    samples = [random_text(rng, rng.randint(0, 200)) for _ in range(300)]
    samples += ["", " ", "\x00", "a\u0301", "🏳️‍🌈 family: 👨‍👩‍👧‍👦", "漢字かなカナ", "\r\n\t\x0b\x0c", " leading",
                "trailing ", "   many   spaces   ", "x" * 5000, EOT, f"a{EOT}b{EOT}"]
    ids_batch = tok.encode_batch(samples)
    for s, ids in zip(samples, ids_batch):
        assert tok.encode(s) == ids
        assert tok.decode(ids) == s
        assert all(0 <= i < tok.vocab_size for i in ids)


def test_long_documents_encoded_in_pieces_give_identical_ids(trained):
    tok = load_tokenizer(trained[0])
    rng = random.Random(5)
    parts = ["\n", "\n\n", " \n", "\n ", "\r\n", "\t\n", "x\ny", "'s\n", "\u3000\n", "\x1c\n", "\n\u00a0"]
    docs = ["".join(rng.choice([*parts, *TEXTS, random_text(rng, 20)]) for _ in range(300)) for _ in range(8)]
    whole = [tok.encode(d) for d in docs]
    assert tok.encode_batch(docs, chunk_chars=50) == whole  # hundreds of cuts per document
    assert tok.encode_batch(docs) == whole


def test_literal_eot_in_text_is_not_the_eot_token(trained):
    tok = load_tokenizer(trained[0])
    ids = tok.encode(f"end{EOT}start")
    assert tok.eot_id not in ids
    assert tok.decode([*tok.encode("a"), tok.eot_id, *tok.encode("b")]) == f"a{EOT}b"


def test_loads_in_transformers(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    root = trained[0]
    tok = load_tokenizer(root)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer" / "tokenizer.json"))
    text = "Hello, wörld! 🙂 def f(x): return x ** 2\n\n日本語"
    assert fast.encode(text, add_special_tokens=False) == tok.encode(text)
    assert fast.decode(tok.encode(text), clean_up_tokenization_spaces=False) == text
    # the folder itself and an export folder load with AutoTokenizer, EOT as eos
    export = tmp_path / "hf"
    write_hf_tokenizer_files(root, export, model_max_length=64)
    assert sorted(p.name for p in export.iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    for folder in (root / "tokenizer", export):
        auto = transformers.AutoTokenizer.from_pretrained(str(folder))
        assert auto.eos_token == EOT and auto.eos_token_id == 0
        assert auto(text)["input_ids"] == tok.encode(text)
        assert auto.decode(tok.encode(text)) == text


def test_byte_budget_bounds_a_deterministic_sample(tmp_path):
    data = make_corpus(tmp_path / "a")
    make_corpus(tmp_path / "b")
    cfg = load_config(None, ["model=tiny", "tokenizer.train_bytes=4000"])
    a = train_tokenizer(cfg, data, tmp_path / "a" / "tok")
    b = train_tokenizer(cfg, tmp_path / "b" / "data", tmp_path / "b" / "tok")
    assert 0 < a["bytes_used"] <= 4000 < a["bytes_total"]
    assert 0 < a["docs_used"] < a["docs_total"]
    assert (a["docs_used"], a["bytes_used"]) == (b["docs_used"], b["bytes_used"])
    assert (tmp_path / "a/tok/tokenizer.json").read_bytes() == (tmp_path / "b/tok/tokenizer.json").read_bytes()


def test_load_tokenizer_paths_and_errors(trained, tmp_path):
    root = trained[0]
    for p in (root, root / "tokenizer", root / "tokenizer" / "tokenizer.json"):
        assert load_tokenizer(p).eot_id == 0
    with pytest.raises(UserError, match=r"no tokenizer found at .*nowhere.*run `antimatter tokenizer`"):
        load_tokenizer(tmp_path / "nowhere")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match=r"tokenizer.json is not a valid tokenizers file"):
        load_tokenizer(bad)


def test_train_errors(tmp_path):
    cfg = load_config(None, ["model=tiny"])
    with pytest.raises(UserError, match=r"no training documents in .*train.*run `antimatter prepare` first"):
        train_tokenizer(cfg, tmp_path / "data", tmp_path / "tok")
    write_split(tmp_path / "data" / "train", ["", ""])
    cfg = load_config(None, ["model=tiny", "tokenizer.train_bytes=1"])
    with pytest.raises(UserError, match=r"no text to learn a tokenizer from"):
        train_tokenizer(cfg, tmp_path / "data", tmp_path / "tok")
    (tmp_path / "data" / "train" / "00000.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(b'{"id": "x", "body": "no text field"}\n'))
    with pytest.raises(UserError, match=r"00000.jsonl.zst:1: not a prepared record with a 'text' field"):
        train_tokenizer(cfg, tmp_path / "data", tmp_path / "tok")


def test_foreign_tokenizer_uses_the_configured_eos(tmp_path):
    """A run imported from a Hugging Face folder may carry a tokenizer whose end token is, e.g., </s>."""
    from tokenizers import pre_tokenizers, trainers

    hf = new_byte_level_bpe()
    hf.train_from_iterator(TEXTS * 3, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match=r"has no <\|endoftext\|> token and no eos_token in a tokenizer_config"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    tok = load_tokenizer(tmp_path)
    assert tok.eot_token == "</s>" and tok.eot_id == 1
    assert tok.decode(tok.encode("plain </s> text")) == "plain </s> text"


# ------------------------------------------------------------------------------- tokenizer.from


def test_adopt_copies_the_file_and_writes_the_transformers_files(trained, tmp_path):
    root = trained[0]
    source = root / "tokenizer" / "tokenizer.json"
    for given in (source, root / "tokenizer", root):  # the file, a folder holding it, a run folder
        out = tmp_path / "adopted"
        cfg = load_config(None, ["model=tiny", f"tokenizer.from={given}"])
        summary = adopt_tokenizer(cfg, out)
        assert (out / "tokenizer.json").read_bytes() == source.read_bytes()
        assert sorted(p.name for p in out.iterdir()) == sorted(summary["files"])
        assert summary["source"] == str(source.resolve()) and summary["vocab_size"] == 512
        assert summary["eot_id"] == EOT_ID and len(summary["sha256"]) == 64
        assert load_tokenizer(out).vocab_size == 512


def test_adopt_takes_a_foreign_eos_from_the_config_beside_it(tmp_path):
    from tokenizers import pre_tokenizers, trainers

    hf = new_byte_level_bpe()
    hf.train_from_iterator(TEXTS * 3, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (tmp_path / "hf").mkdir()
    hf.save(str(tmp_path / "hf" / "tokenizer.json"))
    cfg = load_config(None, ["model=tiny", f"tokenizer.from={tmp_path / 'hf'}"])
    with pytest.raises(UserError, match=r"^tokenizer.from: .*tokenizer.json has no end-of-text token: neither "
                                        r"<\|endoftext\|> nor an eos_token named in a tokenizer_config.json"):
        adopt_tokenizer(cfg, tmp_path / "out")
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert adopt_tokenizer(cfg, tmp_path / "out")["eot_token"] == "</s>"
    tok = load_tokenizer(tmp_path / "out")  # the run's folder names it too
    assert (tok.eot_token, tok.eot_id) == ("</s>", 1)


def test_adopt_errors_are_one_line_each(trained, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    source = trained[0] / "tokenizer" / "tokenizer.json"

    def refused(path: Path, pattern: str, *extra: str) -> None:
        cfg = load_config(None, ["model=tiny", f"tokenizer.from={path}", *extra])
        with pytest.raises(UserError, match=pattern) as e:
            adopt_tokenizer(cfg, tmp_path / "out")
        assert "\n" not in str(e.value)

    refused(tmp_path / "nowhere", r"^tokenizer.from: .*nowhere does not exist: give a tokenizer.json, a Hugging "
                                  r"Face folder holding one, or a run folder$")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", r"^tokenizer.from: .*empty is a folder without tokenizer.json \(nor "
                                r"tokenizer/tokenizer.json\)")
    (tmp_path / "bad.json").write_text("{not json")
    refused(tmp_path / "bad.json", r"^tokenizer.from: .*bad.json is not a tokenizer.json \(invalid JSON at line 1")
    (tmp_path / "bytes.json").write_bytes(b"\xff\xfe\x00garbage")
    refused(tmp_path / "bytes.json", r"^tokenizer.from: .*bytes.json is not a tokenizer.json \(not UTF-8 text\)$")
    broken = json.loads(source.read_text())
    del broken["model"]["vocab"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    refused(tmp_path / "broken.json", r"^tokenizer.from: .*broken.json is not a valid tokenizers file \(")
    wordlevel = Tokenizer(models.WordLevel({"a": 0, EOT: 1}, unk_token="a"))
    wordlevel.save(str(tmp_path / "wordlevel.json"))
    refused(tmp_path / "wordlevel.json", r"^tokenizer.from: .*wordlevel.json has no BPE model \(model.type is "
                                         r"'WordLevel'\): AntiMatter uses byte-level BPE")
    metaspace = json.loads(source.read_text())
    metaspace["pre_tokenizer"] = json.loads(pre_tokenizers.Metaspace().__getstate__())
    (tmp_path / "metaspace.json").write_text(json.dumps(metaspace))
    refused(tmp_path / "metaspace.json", r"^tokenizer.from: .*metaspace.json has no ByteLevel pre-tokenizer: not a "
                                         r"byte-level BPE")
    refused(source, r"^tokenizer.from: .*tokenizer.json has 512 tokens but model.vocab_size is 500: set "
                    r"model.vocab_size=512", "model.vocab_size=500")
    assert not (tmp_path / "out").exists()  # nothing written by a refused adoption

def test_a_corpus_too_small_for_the_vocab_says_so(tmp_path: Path, capsys: pytest.CaptureFixture):
    """Fewer tokens learned than asked: a log line and the stage summary (the manifest's counts) say how many,
    out of how many, and why (no pair left that occurs min_frequency times)."""
    write_split(tmp_path / "data" / "train", TEXTS)
    cfg = load_config(None, ["model=tiny", "model.vocab_size=4096", "tokenizer.vocab_size=4096"])
    info = train_tokenizer(cfg, tmp_path / "data", tmp_path / "tokenizer")
    assert info["vocab_size"] < 4096 == info["requested_vocab_size"]
    note = info["note"]
    assert f"learned {info['vocab_size']:,} of the 4,096 tokens asked by tokenizer.vocab_size" in note
    assert "too small for that many merges" in note and "add text" in note
    assert f"tokenizer.vocab_size={info['vocab_size']}" in note
    assert f"tokenizer: note: {note}" in capsys.readouterr().err


def test_a_vocab_the_corpus_supports_has_no_note(trained):
    tiny = load_config(None, ["model=tiny", "tokenizer.vocab_size=300"])
    root = trained[0]
    info = train_tokenizer(tiny, root / "data", root / "tok300")
    assert info["vocab_size"] == 300 and "note" not in info
