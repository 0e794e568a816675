"""What `import antimatter` offers notebooks and scripts, beside `LLM` (llm.py): `run_pipeline`, the whole
pipeline from a config object, a YAML path or a dict, and `load_config`. `antimatter pipeline` runs through
`run_pipeline` too. Nothing here imports torch: each stage imports what it needs when it runs.

    import antimatter
    run = antimatter.run_pipeline("my.yaml", ["train.max_steps=200"])
    print(run.evaluation["val"]["perplexity"])
    llm = run.llm()                       # antimatter.LLM.load(run.run_dir)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from antimatter import pipeline
from antimatter.config import Override, RunConfig, load_config, validate


@dataclass
class PipelineRun:
    """A finished (or interrupted) `run_pipeline`: the run folder, each stage's summary as it returned it, and
    the evaluation (results/evaluations/final_evaluation.json; None before eval has run)."""

    run_dir: Path
    stages: dict[str, Any]
    evaluation: dict[str, Any] | None

    def llm(self, **options: Any):
        """The run's model for generating and scoring: `LLM.load(run_dir, **options)`."""
        from antimatter.llm import LLM  # here: torch

        return LLM.load(self.run_dir, **options)


def as_config(config: RunConfig | str | Path | dict[str, Any] | None, overrides: list[Override] | None = None
              ) -> RunConfig:
    """A RunConfig from a config object (checked again: it may have been edited), a YAML file or a dict of
    its sections (`{"model": "tiny", "train": {"max_steps": 50}}`), with dotted overrides on top."""
    if isinstance(config, RunConfig):
        if overrides:
            raise ValueError("overrides apply to a YAML path or a dict; set the fields of a RunConfig directly")
        validate(config)
        return config
    return load_config(config, overrides)


def run_pipeline(config: RunConfig | str | Path | dict[str, Any] | None = None,
                 overrides: list[Override] | None = None, *, force: bool = False,
                 stages: tuple[str, ...] = pipeline.STAGE_ORDER) -> PipelineRun:
    """Run prepare -> tokenizer -> tokenize -> train -> eval (or `stages`), each skipped while its outputs
    are current (`force`: redo), printing each stage's progress; returns the run folder and its results."""
    cfg = as_config(config, overrides)
    results = pipeline.run_pipeline(cfg, force=force, stages=stages)
    ev = cfg.run_dir / "results" / "evaluations" / "final_evaluation.json"
    return PipelineRun(cfg.run_dir, results, json.loads(ev.read_text("utf-8")) if ev.is_file() else None)

