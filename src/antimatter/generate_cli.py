"""`antimatter generate`: the command-line shell around `model.generate` - load a run's checkpoint and
tokenizer, then answer one `--prompt` or an interactive session, streaming tokens as they come. The sampling
itself (settings, prompt encoding, decoding) is `model.generate.continue_texts`; nothing here samples."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from antimatter.checkpoint import check_checkpoint_tokenizer, load_model
from antimatter.config import ConfigError, RunConfig, SampleConfig, check_value
from antimatter.device import DTYPES, pick_device, resolve_dtype
from antimatter.errors import UserError, shorten
from antimatter.model.generate import continue_texts
from antimatter.model.quantize import int8_weight_only, require_torchao
from antimatter.tokenizer import load_tokenizer

HELP = """commands: /temp X  /top_k N  /top_p X  /max N  /rep X  /seed N  /settings  /help  /quit
(Ctrl-D or /quit ends the session; an empty line is ignored)"""
COMMANDS = {"temp": ("temperature", float), "top_k": ("top_k", int), "top_p": ("top_p", float),
            "max": ("max_new_tokens", int), "rep": ("repetition_penalty", float), "seed": ("seed", int)}


class StreamPrinter:
    """Decode the growing token list and print only the new text. Byte-level BPE can split one character
    over several tokens, so text ending in an incomplete character (U+FFFD) is held back until it completes."""

    def __init__(self, tokenizer, out=sys.stdout):
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


def load_for_generation(run_dir: Path, checkpoint: str, device: torch.device):
    model, run_cfg, ckpt = load_model(run_dir, which=checkpoint, device=str(device))
    tokenizer = load_tokenizer(run_dir)
    check_checkpoint_tokenizer(ckpt, tokenizer.path, "generate with")
    dtype = resolve_dtype("auto", device)
    if dtype != "fp32":  # a GPU serves a half-precision copy; elsewhere the weights stay as loaded
        model = model.to(DTYPES[dtype])
    return model.eval(), tokenizer, ckpt


def complete(model, tokenizer, prompt: str, s: SampleConfig, compile: bool = False, stream=None) -> dict:
    """Answer one prompt, streaming the text to `stream` when given; returns the text and timing."""
    printer = StreamPrinter(tokenizer, stream) if stream is not None else None
    t0 = time.perf_counter()
    new = continue_texts(model, tokenizer, [prompt], s, on_token=printer, compile=compile)[0]
    dt = time.perf_counter() - t0
    return {"prompt": prompt, "completion": tokenizer.decode(new), "new_tokens": len(new),
            "seconds": dt, "tokens_per_s": len(new) / dt if dt > 0 else 0.0}


def _apply_command(line: str, s: SampleConfig) -> bool:
    """Handle a /command; returns False to quit."""
    parts = line[1:].split()
    if not parts:
        return True
    name, args = parts[0].lower(), parts[1:]
    if name in ("quit", "exit", "q"):
        return False
    if name in COMMANDS and len(args) == 1:
        attr, typ = COMMANDS[name]
        try:
            value = typ(args[0])
        except ValueError:
            print(f"/{name} needs a {typ.__name__}, got '{shorten(args[0])}'")
            return True
        try:  # a bad value keeps the old one and the session: the mistake is one line
            check_value(SampleConfig, attr, value, f"/{name}")
        except ConfigError as e:
            print(e)
            return True
        setattr(s, attr, value)
        print(f"{attr} = {value}")  # said back: a typo in a value shows before the next prompt uses it
    elif name == "settings":
        print(s)
    else:
        print(HELP)
    return True


def _interactive(model, tokenizer, s: SampleConfig, compile: bool) -> int:
    """Prompts and /commands from stdin until /quit or end of input (Ctrl-D); an empty line (an Enter
    pressed twice) is not a reason to lose the loaded model."""
    while True:
        try:
            line = input("\n>>> ")
        except EOFError:
            print()
            return 0
        if not line.strip():
            continue
        if line.startswith("/"):
            if not _apply_command(line, s):
                return 0
            continue
        sys.stdout.write(line)
        r = complete(model, tokenizer, line, s, compile, stream=sys.stdout)
        print(f"\n[{r['new_tokens']} tokens, {r['tokens_per_s']:.1f} tokens/s]")


def run_generate(cfg: RunConfig, run_dir: Path, prompt: str | None = None) -> int:
    """One prompt, or an interactive session, with the settings of `cfg.generate` (checkpoint, device, compile,
    int8 and sampling); a null generate.device runs where the run trained (train.device)."""
    g = cfg.generate
    if not Path(run_dir).is_dir():
        raise UserError(f"run folder {run_dir} does not exist: pass --run PATH of a trained run "
                        f"(or train one with `antimatter quickstart`)")
    if g.int8:
        require_torchao()  # before the checkpoint loads
    dev = pick_device(g.device or cfg.train.device, setting="--device" if g.device else "train.device")
    model, tokenizer, ckpt = load_for_generation(Path(run_dir), g.checkpoint, dev)
    if g.int8:
        int8_weight_only(model)
    if prompt is None:
        print(f"AntiMatter: {ckpt} on {dev}. Type a prompt and press Enter. {HELP}")
        return _interactive(model, tokenizer, g, g.compile)
    sys.stdout.write(prompt)
    r = complete(model, tokenizer, prompt, g, g.compile, stream=sys.stdout)
    print()
    print(f"[{r['new_tokens']} tokens in {r['seconds']:.2f}s, {r['tokens_per_s']:.1f} tokens/s on {dev}]",
          file=sys.stderr)
    return 0
