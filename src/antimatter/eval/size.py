"""Model size: parameters (at the real vocabulary, padding rows not counted), the bytes they take in each
floating-point format, and what the checkpoint really occupies on disk."""

from __future__ import annotations

from pathlib import Path


def model_size(model, checkpoint_dir: Path | None = None) -> dict:
    total = model.num_params()
    non_emb = model.num_params(non_embedding=True)
    out = {"params_total": total, "params_non_embedding": non_emb, "params_embedding": total - non_emb,
           "bytes_fp32": 4 * total, "bytes_fp16": 2 * total, "bytes_bf16": 2 * total,
           "params_stored": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())}
    if checkpoint_dir is not None and Path(checkpoint_dir).is_dir():
        d = Path(checkpoint_dir)
        weights = d / "model.safetensors"
        if weights.is_file():
            out["disk_bytes_weights"] = weights.stat().st_size
        out["disk_bytes_checkpoint"] = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    return out
