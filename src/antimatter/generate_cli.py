"""`antimatter generate`: the command-line shell around `llm.LLM` - load a run's checkpoint and tokenizer,
then answer one `--prompt` or an interactive session, streaming tokens as they come, and say how it went:
the time to the first token, the rate after it, the seed that reproduces the sample, and what the model's
context did to the prompt or the output. Loading, sampling and timing are the Python API's (`LLM.complete`);
nothing here samples."""

from __future__ import annotations

import sys
from pathlib import Path

from antimatter.config import ConfigError, GenerateConfig, RunConfig, check_value
from antimatter.errors import UserError, shorten
from antimatter.llm import LLM, Completion

HELP = """commands: /temp X  /top_k N  /top_p X  /max N  /rep X  /seed N|random  /settings  /help  /quit
(Ctrl-D or /quit ends the session; an empty line is ignored)"""
COMMANDS = {"temp": ("temperature", float), "top_k": ("top_k", int), "top_p": ("top_p", float),
            "max": ("max_new_tokens", int), "rep": ("repetition_penalty", float), "seed": ("seed", int)}


def stats(r: Completion, device: str, seed_option: str) -> str:
    """How an answer went, for the line after it: tokens, the first token's time and the rate after it
    (the first is the prefill: apart, it would hide the rate), the device, and the seed to repeat it."""
    where = f"{device}, {r.threads} thread{'s' if r.threads != 1 else ''}" if device == "cpu" else device
    if r.new_tokens > 1 and r.tokens_per_s:
        line = (f"{r.new_tokens} tokens: first after {r.first_token_s * 1000:.0f} ms, then {r.tokens_per_s:.1f} "
                f"tokens/s on {where}")
    else:
        line = f"{r.new_tokens} token{'s' if r.new_tokens != 1 else ''} in {r.seconds * 1000:.0f} ms on {where}"
    if r.seed is not None:
        line += f"; seed {r.seed} ({seed_option} {r.seed} repeats this sample)"
    return line


def _apply_command(line: str, s: GenerateConfig) -> bool:
    """Handle a /command; returns False to quit."""
    parts = line[1:].split()
    if not parts:
        return True
    name, args = parts[0].lower(), parts[1:]
    if name in ("quit", "exit", "q"):
        return False
    if name in COMMANDS and len(args) == 1:
        attr, typ = COMMANDS[name]
        if attr == "seed" and args[0].lower() in ("random", "none"):
            s.seed = None
            print("seed = random (a new one for each sample)")
            return True
        try:
            value = typ(args[0])
        except ValueError:
            print(f"/{name} needs a {typ.__name__}, got '{shorten(args[0])}'")
            return True
        try:  # a bad value keeps the old one and the session: the mistake is one line
            check_value(GenerateConfig, attr, value, f"/{name}")
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


def _interactive(llm: LLM, s: GenerateConfig) -> int:
    """Prompts and /commands from stdin until /quit or end of input (Ctrl-D); an empty line (an Enter
    pressed twice) is not a reason to lose the loaded model. Each sample draws a new seed unless one is set."""
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
        r = llm.complete(line, s, stream=sys.stdout)
        print(f"\n[{stats(r, llm.device.type, '/seed')}]")
        if r.note:
            print(f"[{r.note}]")


def run_generate(cfg: RunConfig, run_dir: Path, prompt: str | None = None) -> int:
    """One prompt, or an interactive session, with the settings of `cfg.generate` (checkpoint, device, compile,
    int8, threads and sampling); a null generate.device runs where the run trained (train.device)."""
    if not Path(run_dir).is_dir():
        what = "is a file, not a run folder" if Path(run_dir).exists() else "does not exist"
        raise UserError(f"run folder {run_dir} {what}: pass --run PATH of a trained run "
                        f"(or train one with `antimatter quickstart`)")
    llm = LLM.from_config(run_dir, cfg, device_setting="--device" if cfg.generate.device else None)
    s = llm.settings
    if prompt is None:
        seeds = "a new seed for each sample" if s.seed is None else f"seed {s.seed} for every sample"
        print(f"AntiMatter: {llm.checkpoint} on {llm.device} ({seeds}). Type a prompt and press Enter. {HELP}")
        return _interactive(llm, s)
    sys.stdout.write(prompt)
    r = llm.complete(prompt, s, stream=sys.stdout)
    print()
    print(f"[{stats(r, llm.device.type, '--seed')}]", file=sys.stderr)
    if r.note:
        print(f"[{r.note}]", file=sys.stderr)
    return 0
