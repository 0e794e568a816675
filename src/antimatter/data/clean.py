"""Cleaning: make text canonical without changing what it says.

Steps (each switchable per source in SourceConfig): decode UTF-8 (invalid bytes become U+FFFD and the
document is counted), Unicode NFC, mojibake repair with ftfy (only where ftfy's own badness check fires:
running the full fixer on clean text is slow and changes nothing), control characters out, whitespace:
line endings to LF, trailing spaces, runs of blank lines, and for prose runs of spaces inside a line.
Code and reference text keep their inner spacing: indentation and column alignment carry meaning there, as
they do in the code blocks of markdown prose.
"""

from __future__ import annotations

import re
import unicodedata

import ftfy
import ftfy.badness

from antimatter.config import SourceConfig
from antimatter.data.filters import code_block_lines
from antimatter.data.records import valid_unicode

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff]")
_UNICODE_SPACES = re.compile(r"[\u00a0\u2000-\u200a\u202f\u205f\u3000]")
_BLANK_RUNS = re.compile(r"\n{3,}")
_INNER_SPACES = re.compile(r"(\S)[ \t]{2,}(?=\S)")
# only the encoding repair: quotes, controls and normalisation are other steps (or left alone)
_FTFY_CONFIG = ftfy.TextFixerConfig(unescape_html=False, remove_control_chars=False, uncurl_quotes=False,
                                    normalization=None, explain=False)
_NON_ASCII_RUNS = re.compile(r".?[^\x00-\x7f]+.?")


def looks_like_mojibake(text: str) -> bool:
    """ftfy's badness check on the non-ASCII runs only (mojibake lives there), so
    mostly-ASCII text costs little."""
    if text.isascii():
        return False
    return ftfy.badness.is_bad("\n".join(_NON_ASCII_RUNS.findall(text)))


def decode(data: bytes | str) -> tuple[str, bool]:
    """UTF-8 text and whether invalid bytes had to be replaced. Text read as str (JSON, Parquet) may hold lone
    surrogates ("\\ud800" escapes), which have no UTF-8 bytes either: they are replaced and counted alike."""
    if isinstance(data, str):
        fixed = data if data.isascii() else valid_unicode(data)
        return fixed, fixed != data
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def _collapse_inner_spaces(text: str) -> str:
    """Runs of spaces inside prose lines become one space; markdown code blocks keep theirs (a comment aligned
    in an example, the columns of printed output)."""
    if "```" not in text and "~~~" not in text:
        return _INNER_SPACES.sub(r"\1 ", text)
    lines = text.split("\n")
    code = code_block_lines(lines)
    return "\n".join(ln if i in code else _INNER_SPACES.sub(r"\1 ", ln) for i, ln in enumerate(lines))


def clean_text(text: str, src: SourceConfig, kind: str) -> tuple[str, list[str]]:
    """The cleaned text and the names of the steps that changed it (counted in the statistics)."""
    changed: list[str] = []
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if src.fix_mojibake and looks_like_mojibake(text):
        fixed = ftfy.fix_text(text, _FTFY_CONFIG)
        if fixed != text:
            text = fixed
            changed.append("mojibake")
    if src.nfc and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
        changed.append("nfc")
    if src.strip_control:
        new = _CONTROL.sub("", text)
        if len(new) != len(text):
            changed.append("control")
            text = new
    if src.collapse_whitespace:
        new = _UNICODE_SPACES.sub(" ", text)
        new = "\n".join([line.rstrip() for line in new.split("\n")])
        new = _BLANK_RUNS.sub("\n\n", new)
        if kind == "prose":
            new = _collapse_inner_spaces(new)
        new = new.lstrip("\n").rstrip()
        if new != text:
            changed.append("whitespace")
            text = new
    return text, changed
