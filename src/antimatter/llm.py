"""The Python API's model: load once with `LLM.load(path)`, then `.generate(prompt)`, `.score(text)` and
`.export(out_dir)`. `antimatter generate` is a shell over the same object (generate_cli.py), so a notebook,
a script and the command line load, sample and time text through one code path.

What it loads:
  * a run folder (made by `antimatter train`, `pipeline`, `quickstart` or `import`), or one of its checkpoint
    folders, with the run's tokenizer; its config's `generate:` section gives the default sampling settings;
  * a Hugging Face folder (config.json, weights, tokenizer.json) of a GPT-2, Llama or Qwen3 model, as
    `antimatter export` writes it or transformers saves it (read by export.py, checked before it is loaded).
"""

from __future__ import annotations

import dataclasses
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from antimatter.checkpoint import check_checkpoint_tokenizer, load_model
from antimatter.config import GenerateConfig, RunConfig, SampleConfig, check_setting, load_config
from antimatter.device import DTYPES, pick_device, resolve_dtype
from antimatter.errors import UserError
from antimatter.eval.perplexity import score_documents, score_windows, token_byte_lengths
from antimatter.export import export_hf, export_model, load_hf_model
from antimatter.model.generate import continue_ids, decode_threads, slide_window
from antimatter.model.gpt import GPT
from antimatter.model.quantize import int8_weight_only, require_torchao
from antimatter.tokenizer import Tokenizer, load_tokenizer


class StreamPrinter:
    """Decode the growing token list and print only the new text. Byte-level BPE can split one character
    over several tokens, so text ending in an incomplete character (U+FFFD) is held back until it completes."""

    def __init__(self, tokenizer: Tokenizer, out: TextIO = sys.stdout):
        self.tok, self.out, self.ids, self.printed = tokenizer, out, [], ""

    def __call__(self, step: int, tokens: torch.Tensor) -> None:
        tid = int(tokens[0])
        if tid == self.tok.eot_id:
            return
        self.ids.append(tid)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text


@dataclass
class Completion:
    """One answer and how it came: the new text, the seed that reproduces it, and the time split at the first
    token (encoding the prompt, the prefill and the first step) from the rate of the tokens after it."""

    prompt: str
    text: str
    new_tokens: int
    prompt_tokens: int
    seed: int | None  # None: greedy (temperature 0), nothing drawn
    first_token_s: float
    tokens_per_s: float  # the tokens after the first over the time after it; 0 with one token or none
    seconds: float
    threads: int  # CPU threads the decoding ran on
    note: str | None  # what the model's context did to the prompt or the output, in words (`context_note`)


def new_seed() -> int:
    """A seed for a sample the user gave none for: drawn from the OS, so two sessions do not repeat each other."""
    return secrets.randbelow(2**31)


def context_note(prompt_tokens: int, asked: int, generated: int, ctx: int) -> str | None:
    """What the model's context did to an answer (model.generate.continue_ids' rule), or None: below the
    context a long prompt is cut from the left to leave room for the new tokens; at or past it the window
    slides: it holds the last `slide_window(ctx)` tokens (the prompt's, to start) and fills up to the context."""
    if asked < ctx:
        read = ctx - asked
        if prompt_tokens <= read:
            return None
        return (f"the model's context is {ctx} tokens: the prompt was cut to its last {read} to leave room for "
                f"{asked} new ones")
    keep = slide_window(ctx)
    said = []
    if prompt_tokens > keep:
        said.append(f"the prompt was cut to its last {keep} tokens")
    if generated > ctx - keep:
        said.append(f"the window slid, re-reading the last {keep} tokens every {ctx - keep} new ones")
    return f"the model's context is {ctx} tokens: {' and '.join(said)}" if said else None


def with_settings(g: GenerateConfig, **given: Any) -> GenerateConfig:
    """`g` with the values given (None: keep the setting), each checked as its `generate.KEY` is."""
    given = {k: v for k, v in given.items() if v is not None}
    for key, value in given.items():
        check_setting(f"generate.{key}", value, key)
    return dataclasses.replace(g, **given)


def _run_settings(path: Path) -> RunConfig:
    """The config a folder's model comes with: a run's (or checkpoint's) config.yaml, else the defaults."""
    if not path.exists():
        raise UserError(f"{path} does not exist: give a run folder (e.g. runs/quickstart), one of its checkpoint "
                        f"folders, or a Hugging Face model folder")
    if (path / "config.yaml").is_file() and not (path / "config.json").is_file():
        return load_config(path / "config.yaml")
    return RunConfig()


class LLM:
    """A model and its tokenizer, loaded once, with default sampling settings (`settings`: the run's
    `generate:` section). `last` is the latest `Completion` (its seed, its timing)."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, cfg: RunConfig, source: Path, device: torch.device,
                 checkpoint: Path | None = None):
        self.model, self.tokenizer, self.cfg, self.device = model, tokenizer, cfg, device
        self.source = source  # the run folder, or the Hugging Face folder
        self.checkpoint = checkpoint  # the run's checkpoint folder; None for a Hugging Face folder
        self.settings: GenerateConfig = cfg.generate
        self.last: Completion | None = None
        self._byte_lens: np.ndarray | None = None

    @classmethod
    def load(cls, path: str | Path, *, checkpoint: str | None = None, device: str | None = None,
             int8: bool | None = None, compile: bool | None = None, threads: int | None = None) -> LLM:
        """A run folder, one of its checkpoint folders, or a Hugging Face folder. `checkpoint`: best, latest or
        a step folder name; `device`: auto, cpu, cuda, ...; `int8`: weight-only int8 block matmuls (torchao);
        `compile`: a compiled decode step; `threads`: CPU threads while decoding (0 = auto). Left None, each is
        the run's `generate:` setting (for a Hugging Face folder, the default)."""
        path = Path(path)
        cfg = _run_settings(path)
        cfg.generate = with_settings(cfg.generate, checkpoint=checkpoint, device=device, int8=int8,
                                     compile=compile, threads=threads)
        return cls.from_config(path, cfg, device_setting="device" if device else None)

    @classmethod
    def from_config(cls, path: str | Path, cfg: RunConfig, device_setting: str | None = None) -> LLM:
        """The model of `path` with the settings of `cfg.generate` (checkpoint, device, int8, compile, threads;
        a null device: `train.device`, where the run trained). `device_setting` names the device setting in
        an error (the CLI: --device)."""
        path, g = Path(path), cfg.generate
        if g.int8:
            require_torchao()  # before the checkpoint loads
        label = device_setting or ("generate.device" if g.device else "train.device")
        device = pick_device(g.device or cfg.train.device, setting=label)
        if (path / "config.json").is_file():  # a Hugging Face folder
            model, ckpt = load_hf_model(path, device), None
            tokenizer = load_tokenizer(path)
            cfg.model, cfg.train.seq_len = model.cfg, 0
        else:
            model, _, ckpt = load_model(path, which=g.checkpoint, device=device)
            run_dir = path if (path / "checkpoints").is_dir() else ckpt.parent.parent  # RUN/checkpoints/step_N
            tokenizer = load_tokenizer(run_dir)
            check_checkpoint_tokenizer(ckpt, tokenizer.path, "generate with")
            path = run_dir
        dtype = resolve_dtype("auto", device)
        if dtype != "fp32":  # a GPU serves a half-precision copy; elsewhere the weights stay as loaded
            model = model.to(DTYPES[dtype])
        if g.int8:
            int8_weight_only(model)
        return cls(model.eval(), tokenizer, cfg, path, device, ckpt)

    def __repr__(self) -> str:
        what = self.checkpoint if self.checkpoint is not None else self.source
        return f"LLM({what}, {self.model.num_params():,} parameters on {self.device})"

    # ---------------------------------------------------------------------------------------- generate

    def sampling(self, **given: Any) -> GenerateConfig:
        """`settings` with the values given (None: keep the setting), each checked as its config key is."""
        return with_settings(self.settings, **given)

    def generate(self, prompt: str, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                 seed: int | None = None, stream: TextIO | None = None) -> str:
        """The continuation of `prompt` (the new text only). A setting left None is `settings`' (the run's
        `generate:` section); with no seed there either, each call draws one, kept in `last.seed`. `stream`:
        a text stream (e.g. sys.stdout) that the text is printed to as it comes."""
        s = self.sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          repetition_penalty=repetition_penalty, seed=seed)
        return self.complete(prompt, s, stream).text

    def complete(self, prompt: str, settings: SampleConfig | None = None, stream: TextIO | None = None
                 ) -> Completion:
        """Answer one prompt with `settings` (default: `settings`), streaming to `stream` when given."""
        s = settings or self.settings
        seed = None if s.temperature <= 0 else s.seed if s.seed is not None else new_seed()
        s = dataclasses.replace(s, seed=seed)
        threads = getattr(s, "threads", self.settings.threads)
        printer = StreamPrinter(self.tokenizer, stream) if stream is not None else None
        times: list[float] = []

        def on_token(step: int, tokens: torch.Tensor) -> None:
            int(tokens[0])  # the token is there (a GPU computes ahead of the host)
            times.append(time.perf_counter())
            if printer is not None:
                printer(step, tokens)

        t0 = time.perf_counter()
        ids = self.tokenizer.encode(prompt) or [self.tokenizer.eot_id]  # an empty prompt starts a new document
        new = continue_ids(self.model, [ids], s, self.tokenizer.eot_id, on_token=on_token,
                           compile=getattr(s, "compile", self.settings.compile), threads=threads)[0]
        end = time.perf_counter()
        after = times[-1] - times[0] if len(times) > 1 else 0.0
        self.last = Completion(
            prompt=prompt, text=self.tokenizer.decode(new), new_tokens=len(new), prompt_tokens=len(ids), seed=seed,
            first_token_s=(times[0] if times else end) - t0, tokens_per_s=(len(times) - 1) / after if after else 0.0,
            seconds=end - t0, threads=decode_threads(self.model, 1, threads),
            note=context_note(len(ids), s.max_new_tokens, len(new), self.model.cfg.block_size))
        return self.last

    # ---------------------------------------------------------------------------------- score, export

    def score(self, text: str) -> dict[str, float | int]:
        """Loss (nats per token), perplexity, bits per byte and the number of scored tokens of `text`, read as
        one document the way `antimatter eval --data FILE.txt` reads a text file (the same figures)."""
        if not text.strip():
            raise UserError("score: the text is empty: give some text to score")
        if self._byte_lens is None:
            self._byte_lens = token_byte_lengths(self.tokenizer, self.model.cfg.vocab_size)
        seq_len, stride = score_windows(self.cfg, self.model.cfg.block_size, self.cfg.eval)
        s = score_documents(self.model, self.tokenizer, [text], seq_len, stride, self._byte_lens,
                            batch_size=self.cfg.eval.batch_size, dtype=self.cfg.eval.dtype, progress=False)
        return {"loss": s.loss, "perplexity": s.perplexity, "bits_per_byte": s.bits_per_byte, "tokens": s.tokens}

    def export(self, out_dir: str | Path, dtype: str | None = None) -> Path:
        """A Hugging Face folder of this model (`dtype`: fp32, fp16 or bf16; default the run's export.dtype),
        written from the files it was loaded from, not from the copy it generates with (half precision on a
        GPU, int8 when asked): a run's checkpoint by `antimatter export`'s code, card included."""
        dtype = dtype or self.cfg.export.dtype
        check_setting("export.dtype", dtype, "dtype")
        if self.checkpoint is not None:
            return export_hf(self.source, out_dir, checkpoint=str(self.checkpoint), dtype=dtype)
        return export_model(load_hf_model(self.source), out_dir, dtype, self.tokenizer.path,
                            card={"name": self.source.name, "source": str(self.source)})
