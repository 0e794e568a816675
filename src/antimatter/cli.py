"""`antimatter` command line: parse, dispatch, nothing else. Each stage lives in its own module.

Every option that is a setting is an alias of one dotted config key (the table FLAGS): `--workers 4` is
`data.workers=4`, checked as that key is and named as typed in an error. The other options name what a command
reads and writes (--run, --out, --data, --prompt, ...) and are not settings.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zstandard import ZstdError

from antimatter import pipeline
from antimatter.compile_cache import bytecode_note, use_bytecode_cache
from antimatter.config import RunConfig, check_setting, load_config, setting_type
from antimatter.errors import UserError, shorten

_RUN = ("--run", dict(help="run folder (default: RUNS_DIR/NAME)"))

# command -> (its help, its options that are not settings: what it reads and writes), in the order of --help
COMMANDS: dict[str, tuple[str, list[tuple[str, dict[str, Any]]]]] = {
    "prepare": ("clean, filter, deduplicate and split raw text into train/val",
                [("--out", dict(help="output folder (default: RUN/data)"))]),
    "tokenizer": ("train a byte-level BPE tokenizer on the train split (or adopt tokenizer.from=PATH)", []),
    "tokenize": ("encode the splits into binary token shards", []),
    "train": ("train the model (one process, or many under torchrun)", []),
    "eval": ("perplexity, bits per byte, BLEU/ROUGE-L, speed, size, plots", [
        ("--run", dict(help="run folder to evaluate (default: RUNS_DIR/NAME)")),
        ("--data", dict(nargs="+", help="score only these files (txt, md, jsonl[.gz|.zst]) into the run's "
                                        "evaluation history; final_evaluation.json stays as it is")),
        ("--compare", dict(nargs="+", metavar="RUN", help="print a table comparing these runs (a warning line "
                                                          "when their tokenizers or val sets differ)"))]),
    "generate": ("sample text: one-shot with --prompt, else an interactive prompt", [
        _RUN, ("--prompt", dict(help="prompt text; without it an interactive session starts"))]),
    "export": ("write a Hugging Face folder (config.json, safetensors, tokenizer)", [
        _RUN, ("--out", dict(required=True, help="output folder"))]),
    "import": ("load a Hugging Face model (a local folder or a Hub id) into a new run", [
        ("--hf", dict(required=True, help="local folder with config.json and weights, or a Hugging Face Hub id "
                                          "(gpt2, org/name) found in the Hub cache or downloaded into it; a "
                                          "local path that exists wins")),
        ("--out", dict(required=True, help="run folder to create"))]),
    "pipeline": ("run every stage in order, skipping those already current", []),
    "quickstart": ("the whole pipeline on the embedded corpus, tiny model, CPU", []),
    "info": ("parameter count, FLOPs per token and memory of a model config", [
        ("--gpu", dict(help="plan for this GPU (H100, H200, A100-80GB, A100-40GB, L4, T4, V100)")),
        ("--micro-batch", dict(type=int, help="micro-batch size for the memory estimate")),
        ("--tokens", dict(type=float, help="estimate the time to train on this many tokens"))]),
}
STAGES = list(COMMANDS)


@dataclass(frozen=True)
class Flag:
    """An option that sets one config key: `--option VALUE` is `key=VALUE` (a switch sets it true)."""

    option: str
    key: str
    commands: tuple[str, ...]
    help: str


FLAGS: tuple[Flag, ...] = (
    Flag("--name", "name", tuple(STAGES), "run name: artifacts go to RUNS_DIR/NAME (default from config)"),
    Flag("--runs-dir", "runs_dir", tuple(STAGES), "folder that holds runs (default: runs)"),
    Flag("--model", "model", ("info",), "model preset (e.g. seed-300m); default: the config's model"),
    Flag("--workers", "data.workers", ("prepare",), "worker processes (default: all cores)"),
    Flag("--keep-rejects", "data.keep_rejects", ("prepare",), "write removed documents for inspection"),
    Flag("--strict", "data.strict", ("prepare",), "stop at the first malformed input line"),
    Flag("--prepared", "data.prepared", ("tokenizer", "tokenize", "pipeline"),
         "a folder `antimatter prepare PATH... --out DIR` wrote: read it instead of preparing RUN/data"),
    Flag("--resume", "train.resume", ("train",), "auto (continue from latest), none, or a checkpoint folder"),
    Flag("--checkpoint", "eval.checkpoint", ("eval",), "best, latest, or a checkpoint folder"),
    Flag("--checkpoint", "generate.checkpoint", ("generate",), "best, latest, or a checkpoint folder"),
    Flag("--device", "generate.device", ("generate",), "cpu, cuda, ... (default: train.device)"),
    Flag("--compile", "generate.compile", ("generate",), "compile the decode step (CUDA graphs on GPUs)"),
    Flag("--int8", "generate.int8", ("generate",), "weight-only int8 block matmuls (torchao): half their bytes "
         "per token; `antimatter eval` with eval.int8=true measures the perplexity it costs"),
    Flag("--max-new-tokens", "generate.max_new_tokens", ("generate",), "tokens to generate"),
    Flag("--temperature", "generate.temperature", ("generate",), "sampling temperature (0 = greedy)"),
    Flag("--top-k", "generate.top_k", ("generate",), "sample from the k most likely tokens (0 = off)"),
    Flag("--top-p", "generate.top_p", ("generate",), "nucleus sampling threshold"),
    Flag("--repetition-penalty", "generate.repetition_penalty", ("generate",),
         "penalty on tokens already in the text (1 = off)"),
    Flag("--seed", "generate.seed", ("generate",), "sampling seed (default: a new one for each sample, printed)"),
    Flag("--threads", "generate.threads", ("generate",), "CPU threads while decoding (0 = auto: one for a small "
         "model's few rows, else torch's default)"),
    Flag("--checkpoint", "export.checkpoint", ("export",), "best, latest, or a checkpoint folder"),
    Flag("--dtype", "export.dtype", ("export",), "precision of the exported weights"),
)
_DEST = "setting:"  # argparse dest of a flag: this prefix + its key (absent unless given)


def _common(p: argparse.ArgumentParser, positional_paths: bool = False) -> None:
    p.add_argument("--config", "-c", help="YAML config file (sections: model, data, tokenizer, train, ...)")
    p.add_argument("--force", action="store_true", help="redo the stage even if its outputs are current")
    help_ = ("input paths (files, folders, globs) and/or dotted overrides like train.lr=3e-4"
             if positional_paths else "dotted config overrides, e.g. train.lr=3e-4 model.n_layer=12")
    p.add_argument("args", nargs="*", metavar="PATH|KEY=VALUE" if positional_paths else "KEY=VALUE", help=help_)


def _add_flag(p: argparse.ArgumentParser, flag: Flag) -> None:
    """The option, typed as its key is annotated: a switch for a bool, int or float, else a string (a
    Literal's choices shown, and checked with the key's own message)."""
    tp = setting_type(flag.key)
    kwargs: dict[str, Any] = dict(dest=_DEST + flag.key, default=argparse.SUPPRESS, help=f"{flag.help} [{flag.key}]")
    if tp is bool:
        kwargs["action"] = "store_true"
    else:
        choices = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else ()
        kwargs["type"] = tp if tp in (int, float) else str
        kwargs["metavar"] = "{" + ",".join(choices) + "}" if choices else flag.option[2:].replace("-", "_").upper()
    p.add_argument(flag.option, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="antimatter",
        description="Train GPT-style language models from scratch: prepare -> tokenizer -> tokenize -> "
                    "train -> eval -> generate -> export.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command, (help_, options) in COMMANDS.items():
        p = sub.add_parser(command, help=help_)
        _common(p, positional_paths=command == "prepare")
        for flag in FLAGS:
            if command in flag.commands:
                _add_flag(p, flag)
        for option, kwargs in options:
            p.add_argument(option, **kwargs)
    return parser


def flag_overrides(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """The (key, value) overrides that the options given stand for, each checked as its key is and named as
    typed (`--top-k must be >= 0 (0 = off), got -5`)."""
    out = []
    for flag in FLAGS:
        if args.command in flag.commands and hasattr(args, _DEST + flag.key):
            value = getattr(args, _DEST + flag.key)
            check_setting(flag.key, value, flag.option)
            out.append((flag.key, value))
    return out


def split_paths_and_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """KEY=VALUE items are overrides unless a file of that name exists (a path may contain '=')."""
    overrides = [a for a in items if "=" in a and not _exists(a)]
    return [a for a in items if a not in overrides], overrides


def _exists(path: str) -> bool:
    try:
        return Path(path).exists()
    except OSError:  # e.g. a name longer than the file system allows: not an existing file
        return False


@dataclass(frozen=True)
class Invocation:
    """What a command line asks for, before anything runs: the command, the config it runs with (config file,
    then dotted keys, then the options that stand for keys), its input paths (prepare's) and the parsed
    arguments (the options that are not settings: --run, --out, ...)."""

    command: str
    cfg: RunConfig
    paths: list[str]
    args: argparse.Namespace


def resolve(args: argparse.Namespace) -> Invocation:
    """The parsed arguments resolved into the config a command will run with. Apart from dispatch so that
    which setting wins (an option over its key, a run's own config.yaml) can be seen without running the
    command; it reads the config files, and raises UserError for a bad input as the command would."""
    args = argparse.Namespace(**vars(args))  # the caller's stays as parsed
    paths, overrides = split_paths_and_overrides(args.args)
    if paths and args.command != "prepare":
        raise UserError(f"unexpected argument '{shorten(paths[0])}': overrides look like section.key=value")
    if getattr(args, "data", None):  # `--data` swallows what follows it: give back the overrides
        overrides += [d for d in args.data if "=" in d and not Path(d).exists()]
        args.data = [d for d in args.data if d not in overrides]
    settings = [*overrides, *flag_overrides(args)]  # an option given wins over the dotted key it stands for
    if args.command == "quickstart":
        args.config = args.config or str(pipeline.quickstart_config_path())
    run_arg = getattr(args, "run", None)
    if run_arg and not args.config and (Path(run_arg) / "config.yaml").is_file():
        args.config = str(Path(run_arg) / "config.yaml")  # evaluate / sample a run with its own settings
    return Invocation(args.command, load_config(args.config, settings), paths, args)


def dispatch(args: argparse.Namespace) -> int:
    """Run the command the arguments ask for, with the config they resolve to."""
    inv = resolve(args)
    return HANDLERS[inv.command](inv.args, inv.cfg, inv.paths) or 0


# ------------------------------------------------------------------------------------------ commands
# The modules that import torch are imported by the command that needs them, so that `antimatter --help`
# and the data stages do not wait seconds for it.


def _info(args: argparse.Namespace, cfg: RunConfig, paths: list[str]) -> int:
    from antimatter.info import print_info  # here: rich and the sizing tables add 0.3 s to every command

    print_info(cfg, gpu=args.gpu, micro_batch=args.micro_batch, tokens=args.tokens)
    return 0


def _prepare(args: argparse.Namespace, cfg: RunConfig, paths: list[str]) -> int:
    return pipeline.cmd_prepare(cfg, paths, out=args.out, force=args.force)


def _stage(args: argparse.Namespace, cfg: RunConfig, paths: list[str]) -> int:
    pipeline.run_stage(args.command, cfg, force=args.force)
    return 0


def _pipeline(args: argparse.Namespace, cfg: RunConfig, paths: list[str]) -> int:
    from antimatter.api import run_pipeline  # the Python API's call: one code path

    run_pipeline(cfg, force=args.force)
    return 0


def _quickstart(args: argparse.Namespace, cfg: RunConfig, paths: list[str]) -> int:
    return pipeline.quickstart(cfg, force=args.force)


def _run_dir(args: argparse.Namespace, cfg: RunConfig) -> Path:
    return Path(args.run) if args.run else cfg.run_dir


def _eval(args: argparse.Namespace, cfg: RunConfig, paths: list[str]) -> int:
    from antimatter.eval.report import compare_runs, run_eval  # here: torch

    if args.compare:
        print(compare_runs([Path(r) for r in args.compare]))
        return 0
    run_eval(cfg, _run_dir(args, cfg), data_files=args.data)
    return 0


def _generate(args: argparse.Namespace, cfg: RunConfig, paths: list[str]) -> int:
    from antimatter.generate_cli import run_generate  # here: torch

    return run_generate(cfg, _run_dir(args, cfg), prompt=args.prompt)


def _export(args: argparse.Namespace, cfg: RunConfig, paths: list[str]) -> int:
    from antimatter.export import export_hf  # here: torch

    export_hf(_run_dir(args, cfg), Path(args.out), checkpoint=cfg.export.checkpoint, dtype=cfg.export.dtype)
    return 0


def _import(args: argparse.Namespace, cfg: RunConfig, paths: list[str]) -> int:
    from antimatter.export import import_hf  # here: torch

    import_hf(args.hf, Path(args.out))
    return 0


HANDLERS = {"info": _info, "prepare": _prepare, "tokenizer": _stage, "tokenize": _stage, "train": _stage,
            "pipeline": _pipeline, "quickstart": _quickstart, "eval": _eval, "generate": _generate,
            "export": _export, "import": _import}
TORCH_COMMANDS = {"train", "pipeline", "quickstart", "eval", "generate", "export", "import"}  # those that load torch


# import names of dependencies whose pip name differs
PIP_NAMES = {"rouge_score": "rouge-score", "yaml": "pyyaml", "sklearn": "scikit-learn"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # KEY=VALUE overrides may also come after options that follow positional paths
    # (`prepare a.txt --out o data.val_fraction=0.5`), which argparse alone leaves unparsed
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "args") or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.args = [*args.args, *extra]
    if not args.command:
        parser.print_help()
        return 2
    if args.command in TORCH_COMMANDS:  # before torch is imported: an install without bytecode compiles it each start
        use_bytecode_cache()
        if note := bytecode_note():
            print(f"antimatter {args.command}: note: {note}", file=sys.stderr)
    try:
        return dispatch(args) or 0
    except UserError as e:
        print(f"antimatter {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"antimatter {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except ModuleNotFoundError as e:  # a dependency missing from this Python (ours missing is a bug: raise)
        if (e.name or "antimatter").split(".")[0] == "antimatter" or os.environ.get("ANTIMATTER_DEBUG") == "1":
            raise
        top = e.name.split(".")[0]
        print(f"antimatter {args.command}: error: the Python package '{top}' is missing from this environment: "
              f"pip install {PIP_NAMES.get(top, top)} (or reinstall antimatter, which depends on it)", file=sys.stderr)
        return 1
    except (OSError, EOFError, UnicodeDecodeError, zlib.error, ZstdError) as e:  # the file system or a file's bytes
        if os.environ.get("ANTIMATTER_DEBUG") == "1":
            raise
        print(f"antimatter {args.command}: error: {_describe_io_error(e)} "
              f"(ANTIMATTER_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


def _describe_io_error(e: BaseException) -> str:
    """What failed and on which file, without the traceback: disk full, permission, a cut compressed file."""
    if isinstance(e, OSError) and e.strerror:
        where = f": {str(e.filename)[:200]}" if e.filename else ""
        hint = {28: " (free some space, or write elsewhere)", 13: " (check the folder's permissions)",
                30: " (write to another folder)", 36: " (a path, or an argument read as one, is too long)"}
        return f"{e.strerror}{where}{hint.get(e.errno, '')}"
    return f"{type(e).__name__}: {str(e)[:200]}"


if __name__ == "__main__":
    sys.exit(main())
