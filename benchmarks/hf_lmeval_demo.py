"""Set up an offline lm-evaluation-harness check of an AntiMatter export, and AntiMatter's own figures for it.

    .venv/bin/python benchmarks/hf_lmeval_demo.py /tmp/lmeval_demo
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model hf \
        --model_args pretrained=/tmp/lmeval_demo/hf,dtype=float32 --tasks antimatter_local_ppl \
        --include_path /tmp/lmeval_demo/tasks --device cpu --batch_size 1

Writes OUT/tok (a 4,096-token BPE trained on the corpus' Shakespeare), OUT/hf (the `quickstart` preset with a
512 context, random init, exported fp32), OUT/data/test.jsonl (the last 20 Shakespeare documents, first 1,000
characters each) and OUT/tasks/antimatter_local_ppl.yaml, then prints the bits per byte / byte and word
perplexity of our model on that file, computed the way lm-eval's `loglikelihood_rolling` does it (each
document after `<|endoftext|>`, one window: every document fits in the context).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
import zstandard
from tokenizers import pre_tokenizers, trainers

from antimatter.config import preset_model
from antimatter.export import export_model
from antimatter.model.gpt import GPT
from antimatter.tokenizer import EOT, EOT_ID, new_byte_level_bpe

TASK = """task: antimatter_local_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--corpus", type=Path, default=Path("/work/shared/corpus/shakespeare-00000.jsonl.zst"))
    args = ap.parse_args()
    out = args.out
    with open(args.corpus, "rb") as f:
        docs = [json.loads(line)["text"] for line in
                io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")]
    train, test = docs[:-20], [t[:1000] for t in docs[-20:] if t.strip()]
    tok = new_byte_level_bpe()
    tok.train_from_iterator(train, trainers.BpeTrainer(vocab_size=4096, special_tokens=[EOT], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (out / "tok").mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tok" / "tokenizer.json"))
    cfg = dataclasses.replace(preset_model("quickstart"), block_size=512)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    export_model(model, out / "hf", tokenizer_file=out / "tok" / "tokenizer.json")
    (out / "data").mkdir(exist_ok=True)
    (out / "data" / "test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in test))
    (out / "tasks").mkdir(exist_ok=True)
    (out / "tasks" / "antimatter_local_ppl.yaml").write_text(TASK.format(data=(out / "data" / "test.jsonl").resolve()))
    nll = words = nbytes = 0
    with torch.no_grad():
        for t in test:
            ids = tok.encode(t, add_special_tokens=False).ids
            assert len(ids) < cfg.block_size, "document longer than the context"
            x = torch.tensor([[EOT_ID, *ids[:-1]]])
            nll += F.cross_entropy(model(x)[0], torch.tensor(ids), reduction="sum").item()
            words += len(re.split(r"\s+", t))
            nbytes += len(t.encode())
    print(json.dumps({"docs": len(test), "word_perplexity": math.exp(nll / words),
                      "byte_perplexity": math.exp(nll / nbytes), "bits_per_byte": nll / nbytes / math.log(2)}))


if __name__ == "__main__":
    main()
