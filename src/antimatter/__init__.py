"""AntiMatter: train GPT-style language models from scratch, every step for real.

From Python (docs in README.md, "From Python"):

    import antimatter
    run = antimatter.run_pipeline("configs/my.yaml")      # prepare -> tokenizer -> tokenize -> train -> eval
    llm = antimatter.LLM.load(run.run_dir)                 # or a Hugging Face folder
    llm.generate("Once upon a time", max_new_tokens=50, seed=1)
    llm.score("Some text.")                                # loss, perplexity, bits_per_byte, tokens
    llm.export("out/hf")

The names are imported on first use, so `import antimatter` (and `antimatter --help`) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {"LLM": "antimatter.llm", "Completion": "antimatter.llm", "run_pipeline": "antimatter.api",
         "PipelineRun": "antimatter.api", "load_config": "antimatter.config", "RunConfig": "antimatter.config",
         "UserError": "antimatter.errors"}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'antimatter' has no attribute '{name}'")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
