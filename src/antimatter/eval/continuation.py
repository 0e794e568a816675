"""Continuation quality: give the model the start of held-out documents and compare what it writes with
what the documents really say next.

For N val documents of at least P + C tokens (a seeded choice, so the same run always gets the same
documents), the model reads the first P tokens and generates C tokens (greedy unless a temperature is
given). The generated text is scored against the true next C tokens with corpus BLEU (`sacrebleu`) and
ROUGE-L F1 (`rouge-score`), and its diversity with distinct-1/2 (unique word n-grams / all word n-grams over
all continuations) and a repetition rate (share of repeated token 4-grams inside each continuation, the
"seq-rep-4" of Welleck et al. 2019). The same diversity figures of the true continuations are reported next
to them as the human reference point.
"""

from __future__ import annotations

import numpy as np
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

from antimatter.model.generate import generate


def split_documents(stream: np.ndarray, eot_id: int) -> list[np.ndarray]:
    """Cut an EOT-separated token stream into its documents (EOT tokens dropped, empty pieces skipped)."""
    cuts = np.flatnonzero(np.asarray(stream) == eot_id)
    docs, start = [], 0
    for c in [*cuts.tolist(), len(stream)]:
        if c > start:
            docs.append(stream[start:c])
        start = c + 1
    return docs


def pick_documents(docs: list[np.ndarray], n: int, min_len: int, seed: int) -> list[np.ndarray]:
    """A seeded choice of up to n documents with at least min_len tokens, in their original order."""
    eligible = [i for i, d in enumerate(docs) if len(d) >= min_len]
    if len(eligible) > n:
        eligible = sorted(np.random.default_rng(seed).choice(eligible, size=n, replace=False).tolist())
    return [docs[i] for i in eligible]


def distinct_n(texts: list[str], n: int) -> float:
    """Unique word n-grams / all word n-grams, pooled over texts (0 when there are none)."""
    grams = [tuple(w[i: i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(seqs: list[list[int]], n: int = 4) -> float:
    """Mean over sequences of 1 - unique n-grams / n-grams: the share of n-grams that repeat an earlier one
    in the same sequence (0 = no repetition; sequences shorter than n are skipped)."""
    rates = []
    for s in seqs:
        grams = [tuple(s[i: i + n]) for i in range(len(s) - n + 1)]
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return float(np.mean(rates)) if rates else 0.0


def text_metrics(hyps: list[str], refs: list[str]) -> dict:
    """Corpus BLEU and mean ROUGE-L F1 of hypotheses against one reference each."""
    metric = BLEU()
    bleu = metric.corpus_score(hyps, [refs])
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)]
    return {"bleu": bleu.score, "bleu_signature": str(metric.get_signature()),
            "rouge_l_f1": float(np.mean(rouge)) if rouge else 0.0}


def evaluate_continuations(model, tok, stream: np.ndarray, *, n_docs: int, prefix_tokens: int,
                           continuation_tokens: int, seed: int, temperature: float = 0.0, top_k: int = 0,
                           top_p: float = 1.0, batch_size: int = 8, n_examples: int = 3) -> dict:
    """Generate continuations of held-out documents and score them (see the module docstring)."""
    P, C = prefix_tokens, continuation_tokens
    if P + C >= model.cfg.block_size:
        P = max(1, model.cfg.block_size - C - 1)
    docs = pick_documents(split_documents(stream, tok.eot_id), n_docs, P + C, seed)
    settings = {"documents_requested": n_docs, "documents": len(docs), "prefix_tokens": P,
                "continuation_tokens": C, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                "seed": seed, "decoding": "greedy" if temperature <= 0 else "sampled"}
    if not docs:
        return {**settings, "skipped": f"no val document has {P + C} tokens: lower eval.prefix_tokens / "
                                       f"eval.continuation_tokens"}
    prompts = [d[:P].tolist() for d in docs]
    truths = [d[P: P + C].tolist() for d in docs]
    outs: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        outs += generate(model, prompts[i: i + batch_size], C, temperature=temperature, top_k=top_k,
                         top_p=top_p, eot_id=tok.eot_id, seed=seed + i)
    hyps = [tok.decode(o) for o in outs]
    refs = [tok.decode(t) for t in truths]
    return {
        **settings,
        **text_metrics(hyps, refs),
        "distinct_1": distinct_n(hyps, 1), "distinct_2": distinct_n(hyps, 2),
        "repetition_rate_4gram": repetition_rate(outs, 4),
        "mean_generated_tokens": float(np.mean([len(o) for o in outs])),
        "reference": {"distinct_1": distinct_n(refs, 1), "distinct_2": distinct_n(refs, 2),
                      "repetition_rate_4gram": repetition_rate(truths, 4)},
        "examples": [{"prefix": tok.decode(p), "reference": r, "generated": h}
                     for p, r, h in list(zip(prompts, refs, hyps))[:n_examples]],
    }
