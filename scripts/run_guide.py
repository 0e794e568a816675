"""Run every command of docs/GUIDE.md as written, in order, in a fresh folder: the guide cannot rot.

    make guide                                  # = python scripts/run_guide.py
    python scripts/run_guide.py --keep /tmp/g   # keep the folder to look at the runs

The guide speaks of "your text in my_text/" and of the Hub's `gpt2`. Here `my_text/` gets four of the
public-domain books the package ships, the package's own sources as code, and the sample corpus (markdown,
JSON Lines, near-duplicates); the Hub cache is a local folder (HF_HUB_OFFLINE=1: no network) in which `gpt2`
is a tiny GPT-2 with its own byte-level BPE, so the import and the continued run take seconds, not hours. Each
```bash block runs with `bash -e`, each ```python block with this interpreter, with this interpreter's bin
folder first on PATH; the first failure stops the script with the block and its exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "GUIDE.md"
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)
HUB_REVISION = "0" * 40


def guide_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every ```bash and ```python block, in the guide's order."""
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(text)]


def write_my_text(folder: Path) -> None:
    """Stand-in for the reader's own text: books, code and the sample corpus's mixed formats."""
    from antimatter.data.default_corpus import _books
    from antimatter.data.sample import write_sample_corpus

    write_sample_corpus(folder / "notes")
    (folder / "books").mkdir(parents=True)
    for doc_id, text in list(_books().items())[:4]:
        (folder / "books" / f"{doc_id.rsplit('/', 1)[-1]}.txt").write_text(text, encoding="utf-8")
    shutil.copytree(ROOT / "src" / "antimatter", folder / "code", ignore=shutil.ignore_patterns("__pycache__", "*.xz"))


def write_hub_gpt2(cache: Path, my_text: Path) -> None:
    """HF_HUB_CACHE holding `gpt2` as a download leaves it: a tiny GPT-2 and a byte-level BPE of its own."""
    import torch
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    snapshot = cache / "models--gpt2" / "snapshots" / HUB_REVISION
    snapshot.mkdir(parents=True)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted((my_text / "books").glob("*.txt"))]
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=1024, special_tokens=["<|endoftext|>"], show_progress=False)
    tok.save(str(snapshot / "tokenizer.json"))
    (snapshot / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=256, n_embd=64, n_layer=2, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(snapshot)
    (cache / "models--gpt2" / "refs").mkdir()
    (cache / "models--gpt2" / "refs" / "main").write_text(HUB_REVISION)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="run in this folder (created, must be empty) and keep it")
    args = parser.parse_args(argv)

    work = args.keep or Path(tempfile.mkdtemp(prefix="antimatter-guide-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        raise SystemExit(f"{work} is not empty: give an empty or new folder to --keep")
    write_my_text(work / "my_text")
    write_hub_gpt2(work / "hub", work / "my_text")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(work / "hub"), "HF_HOME": str(work / "hf_home"),
           "PYTHONUNBUFFERED": "1"}
    blocks = guide_blocks(GUIDE.read_text(encoding="utf-8"))
    started = time.perf_counter()
    for i, (lang, code) in enumerate(blocks, 1):
        first = code.strip().splitlines()[0]
        print(f"\n=== [{i}/{len(blocks)}] {lang}: {first}", flush=True)
        t0 = time.perf_counter()
        cmd = ["bash", "-e", "-o", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
        rc = subprocess.run(cmd, cwd=work, env=env).returncode
        if rc != 0:
            print(f"\ndocs/GUIDE.md block {i} failed (exit {rc}) in {work}:\n{code}", file=sys.stderr)
            return 1
        print(f"=== [{i}/{len(blocks)}] done in {time.perf_counter() - t0:.0f}s", flush=True)
    print(f"\ndocs/GUIDE.md: all {len(blocks)} blocks ran in {time.perf_counter() - started:.0f}s (in {work})")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
