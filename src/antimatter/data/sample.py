"""A small multi-format sample corpus, written on demand: for tests, notebooks and trying the stage out.

It holds the cases the stage must handle: prose in .txt/.md files and JSON Lines (.jsonl.zst), source
code, exact and near duplicates across files, a list-like page the quality rules remove, and an empty
file. Everything comes from a seeded generator, so the same call writes the same bytes everywhere.
`write_tech_docs` writes a folder of technical markdown (an API reference, a README with badges, an options
table, short reference pages): the shapes the quality rules must keep.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import zstandard

SENTENCES = [
    "The river carried the small boat past the old mill and into the quiet harbour.",
    "Scientists have discovered that the behaviour of the cells changes with the temperature of the water.",
    "In the field of machine learning, a model is trained on examples and then tested on new data.",
    "The future of artificial intelligence depends on the data that we collect and the care we take with it.",
    "She opened the letter with trembling hands and read the first line twice before she understood it.",
    "A good library is not only a collection of books but also a place where people meet and learn.",
    "The committee agreed that the bridge should be repaired before the winter storms arrived.",
    "When the train finally stopped, the passengers stepped out into the cold morning air.",
    "The recipe calls for two cups of flour, a pinch of salt and enough water to make a soft dough.",
    "Historians still argue about the causes of the war and the role that the merchants played in it.",
    "He had walked the same path every day for years, yet that evening everything looked different to him.",
    "The garden was full of roses, and the scent of them drifted through the open windows of the house.",
    "Most of the villagers worked in the fields from dawn until the light began to fade in the west.",
    "The new method reduces the cost of the process by half while keeping the quality of the results.",
    "Children learn language by listening to the people around them and by trying out new words.",
    "The ship was built of oak and iron, and it could carry more than two hundred tons of cargo.",
    "Our teacher explained that the planets move around the sun in paths that are nearly circles.",
    "The old map showed a road that no longer existed and a town that had been renamed long ago.",
    "They waited at the station for an hour, talking about the books they had read that summer.",
    "The engine needs fresh oil and a new filter before it can be used again on the long journey.",
    "A small change in the design made the chair both lighter and stronger than the older model.",
    "The music began softly, with a single violin, and slowly the rest of the orchestra joined in.",
    "Farmers in the valley have grown apples and pears there for more than three hundred years.",
    "The report describes how the city collects its water and how that water is cleaned each day.",
    "After the storm, the fishermen mended their nets and waited for the sea to become calm again.",
    "The museum keeps a collection of clocks, some of which are older than the building itself.",
    "It is often said that the best way to understand a problem is to try to explain it to a friend.",
    "The students measured the length of the shadow at noon and used it to estimate the size of the earth.",
    "Her grandfather told stories about the mountains, the wolves and the long winters of his youth.",
    "The company opened a small office in the harbour town and hired twelve people from the area.",
    "Every morning the baker lit the oven before four o'clock so that the bread would be ready at seven.",
    "The lecture covered the history of printing, from carved wooden blocks to the modern press.",
    "A careful reader will notice that the second chapter repeats an argument made in the first.",
    "The hikers followed the stream uphill until they reached a lake surrounded by tall pine trees.",
    "Good documentation tells the reader what a function does, why it exists and how to use it.",
    "The doctor listened to the patient's heart and then wrote a short note in the record.",
    "Light travels faster than sound, which is why we see the lightning before we hear the thunder.",
    "The workers finished the roof just before the rain, and the whole village came to celebrate.",
    "The poem describes the sea at night, when the moon draws a silver line across the water.",
    "To make the test fair, each group was given the same tools and the same amount of time.",
]

CODE = '''"""Utilities for reading settings files (sample {i})."""

import json
from pathlib import Path


def load_settings(path: str) -> dict:
    """Read a JSON settings file and return its contents as a dictionary."""
    with open(Path(path), encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{{path}}: expected a mapping")
    return data


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


class Settings:
    def __init__(self, path: str, version: int = 1):
        self.values = load_settings(path)
        self.version = version

    def get(self, key: str, default=None):
        return self.values.get(key, default)
'''


def prose_doc(rng: random.Random, n: int = 10) -> str:
    """A paragraph-structured document of `n` distinct sentences drawn from SENTENCES."""
    picked = rng.sample(SENTENCES, n)
    paras = [" ".join(picked[i: i + 3]) for i in range(0, n, 3)]
    return "\n\n".join(paras)


def write_sample_corpus(folder: str | Path, *, n_prose: int = 24, seed: int = 0) -> Path:
    """Write the sample corpus into `folder` (created) and return it."""
    rng = random.Random(seed)
    root = Path(folder)
    (root / "books").mkdir(parents=True, exist_ok=True)
    (root / "code").mkdir(parents=True, exist_ok=True)
    docs = [prose_doc(rng, rng.randint(8, 14)) for _ in range(n_prose)]
    for i, text in enumerate(docs[: n_prose // 2]):
        ext = "md" if i % 3 == 0 else "txt"
        (root / "books" / f"book_{i:03d}.{ext}").write_text(text + "\n", encoding="utf-8")
    records = [{"id": f"web/{i}", "text": t} for i, t in enumerate(docs[n_prose // 2:])]
    records.append({"id": "web/exact-copy", "text": docs[0].upper()})  # exact duplicate (case differs)
    near = docs[1].split(" ")
    near[5] = "boat"
    records.append({"id": "web/near-copy", "text": " ".join(near)})  # near duplicate: one word changed
    records.append({"id": "web/list-page", "text": "\n".join(f"- item {k}" for k in range(40))})
    records.append({"id": "web/empty", "text": "   "})
    with open(root / "web-00000.jsonl.zst", "wb") as raw, zstandard.ZstdCompressor().stream_writer(raw) as f:
        for r in records:
            f.write((json.dumps(r) + "\n").encode())
    for i in range(4):
        (root / "code" / f"settings_{i}.py").write_text(CODE.format(i=i), encoding="utf-8")
    (root / "books" / "empty.txt").write_text("", encoding="utf-8")
    return root


# ------------------------------------------------------------------------------------ technical markdown

TECH_README = """# tinyhttp

[![CI](https://github.com/example/tinyhttp/actions/workflows/ci.yml/badge.svg?branch=main&event=push)](https://github.com/example/tinyhttp/actions/workflows/ci.yml?query=branch%3Amain)
[![PyPI version](https://img.shields.io/pypi/v/tinyhttp.svg?style=flat-square&logo=python&logoColor=white)](https://pypi.org/project/tinyhttp/)
[![Coverage](https://img.shields.io/codecov/c/github/example/tinyhttp/main.svg?style=flat-square&token=abcdef)](https://codecov.io/gh/example/tinyhttp)
[![License](https://img.shields.io/github/license/example/tinyhttp.svg?style=flat-square&color=blue)](https://github.com/example/tinyhttp/blob/main/LICENSE)
[![Downloads](https://static.pepy.tech/badge/tinyhttp/month?style=flat-square&units=international)](https://pepy.tech/project/tinyhttp)

A small HTTP client for Python with connection pooling, timeouts and retries. It keeps one connection
per host open and reuses it, so that a script that talks to the same server many times does not pay
for a new handshake every time.

## Install

```bash
pip install tinyhttp
```

## Quick start

```python
import tinyhttp

# one client per program: it holds the pool
client = tinyhttp.Client(timeout=5.0)
response = client.get("https://example.org/")
print(response.status)  # 200
```

See the [API reference](reference.md) for every function and the [options](options.md) for the settings.
"""

TECH_FUNCTIONS = [
    ("get", "Fetch a resource. It is safe to repeat: the server changes nothing."),
    ("post", "Send data to be processed; the body is encoded from `json=` or taken as bytes from `data=`."),
    ("put", "Replace a whole resource, so send every field and not only the changed ones."),
    ("patch", "Change some fields of a resource; the server keeps the others as they were."),
    ("delete", "Remove a resource. Most servers answer 204 with an empty body once it is gone."),
    ("head", "Ask for the headers alone. No body comes back, which makes it a cheap check for existence."),
    ("options", "List the methods a server allows on a path, as named in the `Allow` header of its answer."),
]

TECH_OPTIONS = [
    ("timeout", "float", "10.0", "seconds to wait for an answer"),
    ("retries", "int", "0", "attempts after a connection error"),
    ("pool_size", "int", "10", "connections kept open per host"),
    ("max_redirects", "int", "5", "redirects followed before an error"),
    ("verify", "bool", "true", "check the server's certificate"),
    ("proxy", "str", "none", "proxy URL, e.g. http://127.0.0.1:3128"),
    ("user_agent", "str", "tinyhttp/1.0", "User-Agent header"),
    ("keep_alive", "float", "60.0", "seconds an idle connection stays open"),
    ("backoff", "float", "0.5", "seconds before the first retry, doubled each time"),
    ("http2", "bool", "false", "use HTTP/2 where the server offers it"),
]

TECH_SHORT_PAGES = {
    "errors.md": """# Errors

| exception | raised when |
|---|---|
| `TimeoutError` | the server does not answer in time |
| `ConnectionError` | the host cannot be reached |
| `TooManyRedirects` | more than `max_redirects` redirects |
""",
    "close.md": """# `Client.close()`

Close every pooled connection.

```python
client.close()
```
""",
}


def tech_reference() -> str:
    """An API reference page: one section per function with a signature, a parameter list that repeats
    from function to function, the errors it raises and a code example."""
    parts = ["# API reference\n\nEvery request function of `tinyhttp.Client` takes the same keyword arguments "
             "and returns a `Response`. They differ in the HTTP method they send.\n"]
    for name, doc in TECH_FUNCTIONS:
        parts.append(f"""## `Client.{name}(url, *, timeout=None, headers=None, retries=0)`

{doc}

* `url` {{str}} The address of the resource, with its scheme.
* `timeout` {{float}} Seconds to wait for the server. **Default:** the client's timeout.
* `headers` {{dict}} Extra request headers, merged over the client's own.
* `retries` {{int}} How many times to try again after a connection error. **Default:** `0`.
* Returns: {{Response}}

Raises:

* `TimeoutError` when the server does not answer within `timeout` seconds.
* `ConnectionError` when the host cannot be reached after `retries` attempts.

```python
# {name}: one call, then read the status
response = client.{name}("https://example.org/items/1", timeout=2.0)
# check the answer
assert response.status < 400
```
""")
    return "\n".join(parts)


def tech_options() -> str:
    """A settings page that is mostly one table."""
    rows = "\n".join(f"| `{n}` | {t} | `{d}` | {desc} |" for n, t, d, desc in TECH_OPTIONS)
    return ("# Options\n\n`Client(**options)` takes these settings; each one can also be given per request.\n\n"
            f"| option | type | default | meaning |\n|--------|------|---------|---------|\n{rows}\n\n"
            "Settings given to a request win over the client's.\n")


def write_tech_docs(folder: str | Path) -> Path:
    """Write the technical markdown folder into `folder` (created) and return it."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    pages = {"README.md": TECH_README, "reference.md": tech_reference(), "options.md": tech_options(),
             **TECH_SHORT_PAGES}
    for name, text in pages.items():
        (root / name).write_text(text, encoding="utf-8")
    return root
