"""Rebuild the embedded corpus's English prose (src/antimatter/data/prose/) from the shared raw corpus.

    python scripts/build_default_prose.py --corpus /path/to/corpus

`--corpus` is the folder of the raw multi-source corpus (`gutenberg-NNNNN.jsonl.zst` shards of
`{"id", "source", "text"}` records). The books listed in BOOKS are read by id, the eBook licence header and
footer and every line naming the distributor are cut out (what is left is the plain public-domain text),
hard-wrapped paragraphs are joined into one line each (verse and indented blocks keep their lines), and the
result is written as xz-compressed JSON Lines, one book a record, in the order of BOOKS. SOURCES.md beside it
is written from the same run (sizes and sha256), so the two never disagree. Same input, same bytes out.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import re
import sys
from pathlib import Path

import zstandard

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "src" / "antimatter" / "data" / "prose"
OUT_FILE = "books.jsonl.xz"
DISTRIBUTOR = "gutenberg"  # the name that must not appear in what is shipped (any case)

# (slug, title, author, year of first publication, id in the raw corpus): narrative and essays first published
# before 1930 (in the public domain in the USA), varied in author, period and genre
BOOKS = [
    ("the-war-of-the-worlds", "The War of the Worlds", "H. G. Wells", 1898,
     "gutenberg/Wells, H. G. (Herbert George)/The War of the Worlds.txt"),
    ("a-christmas-carol", "A Christmas Carol", "Charles Dickens", 1843,
     "gutenberg/Dickens, Charles/A Christmas Carol.txt"),
    ("the-wisdom-of-father-brown", "The Wisdom of Father Brown", "G. K. Chesterton", 1914,
     "gutenberg/Chesterton, G. K. (Gilbert Keith)/The Wisdom of Father Brown.txt"),
    ("daisy-miller", "Daisy Miller: A Study", "Henry James", 1879,
     "gutenberg/James, Henry/Daisy Miller: A Study.txt"),
    ("grimms-fairy-tales", "Grimms' Fairy Tales (tr. Edgar Taylor and Marian Edwardes)", "Jacob and Wilhelm Grimm",
     1823, "gutenberg/Grimm, Jacob/Grimms' Fairy Tales.txt"),
    ("round-the-world-in-eighty-days", "Round the World in Eighty Days (tr. Henry Frith)", "Jules Verne", 1878,
     "gutenberg/Verne, Jules/Round the World in Eighty Days.txt"),
    ("across-the-plains", "Across the Plains, with Other Memories and Essays", "Robert Louis Stevenson", 1892,
     "gutenberg/Stevenson, Robert Louis/Across the Plains, with Other Memories and Essays.txt"),
    ("the-book-of-dragons", "The Book of Dragons", "E. Nesbit", 1900,
     "gutenberg/Nesbit, E. (Edith)/The Book of Dragons.txt"),
    ("love-and-other-stories", "Love and Other Stories (tr. Constance Garnett)", "Anton Chekhov", 1922,
     "gutenberg/Chekhov, Anton Pavlovich/Love and Other Stories.txt"),
    ("the-disappearance-of-lady-frances-carfax", "The Disappearance of Lady Frances Carfax", "Arthur Conan Doyle",
     1911, "gutenberg/Doyle, Arthur Conan/The Disappearance of Lady Frances Carfax.txt"),
    ("revolution-and-other-essays", "Revolution, and Other Essays", "Jack London", 1910,
     "gutenberg/London, Jack/Revolution, and Other Essays.txt"),
    ("a-tramp-abroad-part-1", "A Tramp Abroad, Part 1", "Mark Twain", 1880,
     "gutenberg/Twain, Mark/A Tramp Abroad — Volume 01.txt"),
    ("bracebridge-hall", "Bracebridge Hall", "Washington Irving", 1822,
     "gutenberg/Irving, Washington/Bracebridge Hall.txt"),
    ("therese-raquin", "Therese Raquin (tr. Edward Vizetelly)", "Emile Zola", 1901,
     "gutenberg/Zola, Émile/Theresa Raquin.txt"),
    ("the-tale-of-peter-rabbit", "The Tale of Peter Rabbit", "Beatrix Potter", 1902,
     "gutenberg/Potter, Beatrix/The Tale of Peter Rabbit.txt"),
]

_START = re.compile(r"^\*\*\* ?START OF[^\n]*\n", re.M)
_END = re.compile(r"^\*\*\* ?END OF", re.M)
# paragraphs that are about the transcription, not the book
_NOTE = re.compile(r"^\s*(produced by|e-text prepared by|transcribed from|transcriber|html version|note:|"
                   r"page \d+,|\+-+\+|\|transcriber)", re.I)
_ILLUSTRATION = re.compile(r"^\s*\[illustration[^\]]*\]\s*$", re.I | re.S)


def read_books(corpus: Path) -> dict[str, str]:
    """{raw id: text} of the BOOKS records in the corpus's gutenberg shards."""
    wanted = {b[4] for b in BOOKS}
    out: dict[str, str] = {}
    for shard in sorted(corpus.glob("gutenberg-*.jsonl.zst")):
        with open(shard, "rb") as f:
            for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8"):
                rec = json.loads(line)
                if rec["id"] in wanted:
                    out[rec["id"]] = rec["text"]
    missing = sorted(wanted - set(out))
    if missing:
        sys.exit(f"not in {corpus}: {missing}: point --corpus at the raw corpus folder")
    return out


def _reflow(para: str) -> str:
    """One line for a hard-wrapped prose paragraph; verse, tables and indented blocks as they are."""
    lines = para.split("\n")
    if len(lines) > 1 and not any(ln[:1].isspace() for ln in lines) and all(len(ln) >= 45 for ln in lines[:-1]):
        return " ".join(ln.strip() for ln in lines)
    return para


def clean_book(raw: str) -> str:
    """The book's own text: between the licence header and footer, without the notes about the eBook."""
    start, end = _START.search(raw), _END.search(raw)
    if not start or not end:
        raise ValueError("no START/END markers")
    paras = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", raw[start.end():end.start()])]
    keep = [p for p in paras if p.strip() and DISTRIBUTOR not in p.lower() and "pgdp.net" not in p
            and "pglaf.org" not in p and not _NOTE.match(p) and not _ILLUSTRATION.match(p)]
    text = "\n\n".join(_reflow(p.rstrip()) for p in keep) + "\n"
    assert DISTRIBUTOR not in text.lower()
    return text


def build(corpus: Path, out_dir: Path) -> list[dict]:
    raw = read_books(corpus)
    rows = []
    buf = io.BytesIO()
    for slug, title, author, year, rid in BOOKS:
        text = clean_book(raw[rid])
        rec = {"id": f"default/prose/{slug}", "title": title, "author": author, "year": year, "text": text}
        buf.write(json.dumps(rec, ensure_ascii=False).encode("utf-8") + b"\n")
        rows.append({"id": rec["id"], "title": title, "author": author, "year": year, "origin": rid,
                     "bytes": len(text.encode("utf-8"))})
    data = lzma.compress(buf.getvalue(), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                         preset=9 | lzma.PRESET_EXTREME)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / OUT_FILE).write_bytes(data)
    (out_dir / "SOURCES.md").write_text(sources_md(rows, len(buf.getvalue()), data), encoding="utf-8")
    return rows


def sources_md(rows: list[dict], raw_bytes: int, data: bytes) -> str:
    lines = [
        "# The embedded corpus's English prose",
        "",
        f"`{OUT_FILE}`: xz-compressed JSON Lines, one book a record: "
        '`{"id", "title", "author", "year", "text"}`.',
        "",
        f"- file: `{OUT_FILE}` {len(data):,} bytes, sha256 `{hashlib.sha256(data).hexdigest()}`",
        f"- text: {len(rows)} books, {sum(r['bytes'] for r in rows):,} bytes of UTF-8 text "
        f"({raw_bytes:,} bytes of JSON Lines before compression)",
        "- built by: `python scripts/build_default_prose.py --corpus CORPUS` (deterministic: the same input gives "
        "the same bytes)",
        "",
        "## Origin and licence",
        "",
        "Every text is a Project Gutenberg eBook of a work first published before 1930 (translations included),",
        "taken from the plain-text files of the GitHub repository rcdm-uga/Gutenberg_Text at commit",
        "a0b16d35a9851168ce9ac649851c17b7ab08d48e. The Project Gutenberg License header and footer, the producers'",
        "and transcribers' notes and every mention of the Project Gutenberg name were removed, as that licence",
        "allows; what remains is plain text in the public domain in the USA. Illustration placeholders were",
        "dropped and hard-wrapped paragraphs joined into one line each (verse and indented blocks keep their",
        "lines).",
        "",
        "| id | title | author | first published in English | text bytes | origin (file in the repository above) |",
        "|---|---|---|---:|---:|---|",
    ]
    for r in rows:
        origin = r["origin"].removeprefix("gutenberg/")
        lines.append(f"| `{r['id']}` | {r['title']} | {r['author']} | {r['year']} | {r['bytes']:,} | {origin} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, required=True, help="the raw corpus folder (gutenberg-*.jsonl.zst)")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help=f"where to write {OUT_FILE} and SOURCES.md")
    args = ap.parse_args()
    rows = build(args.corpus, args.out)
    size = (args.out / OUT_FILE).stat().st_size
    print(f"{len(rows)} books, {sum(r['bytes'] for r in rows):,} bytes of text -> {args.out / OUT_FILE} "
          f"({size:,} bytes)")


if __name__ == "__main__":
    main()
