"""`antimatter` command line: parse, dispatch, nothing else. Each stage lives in its own module."""

from __future__ import annotations

import argparse
import os
import sys
import zlib
from pathlib import Path

from zstandard import ZstdError

from antimatter.errors import UserError, shorten

STAGES = "prepare tokenizer tokenize train eval generate export import pipeline quickstart info".split()


def _common(p: argparse.ArgumentParser, positional_paths: bool = False) -> None:
    p.add_argument("--config", "-c", help="YAML config file (sections: model, data, tokenizer, train, ...)")
    p.add_argument("--name", help="run name: artifacts go to RUNS_DIR/NAME (default from config)")
    p.add_argument("--runs-dir", help="folder that holds runs (default: runs)")
    p.add_argument("--force", action="store_true", help="redo the stage even if its outputs are current")
    help_ = ("input paths (files, folders, globs) and/or dotted overrides like train.lr=3e-4"
             if positional_paths else "dotted config overrides, e.g. train.lr=3e-4 model.n_layer=12")
    p.add_argument("args", nargs="*", metavar="PATH|KEY=VALUE" if positional_paths else "KEY=VALUE", help=help_)


def _sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)


def build_parser() -> argparse.ArgumentParser:
    from antimatter.config import DTYPE_NAMES  # here, like every other import, to keep `--help` quick

    parser = argparse.ArgumentParser(
        prog="antimatter",
        description="Train GPT-style language models from scratch: prepare -> tokenizer -> tokenize -> "
                    "train -> eval -> generate -> export.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("prepare", help="clean, filter, deduplicate and split raw text into train/val")
    _common(p, positional_paths=True)
    p.add_argument("--out", help="output folder (default: RUN/data)")
    p.add_argument("--workers", type=int, help="worker processes (default: all cores)")
    p.add_argument("--keep-rejects", action="store_true", help="write removed documents for inspection")
    p.add_argument("--strict", action="store_true", help="stop at the first malformed input line")

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on the train split")
    _common(p)
    p = sub.add_parser("tokenize", help="encode the splits into binary token shards")
    _common(p)

    p = sub.add_parser("train", help="train the model (one process, or many under torchrun)")
    _common(p)
    p.add_argument("--resume", help="auto (continue from latest), none, or a checkpoint folder")

    p = sub.add_parser("eval", help="perplexity, bits per byte, BLEU/ROUGE-L, speed, size, plots")
    _common(p)
    p.add_argument("--run", help="run folder to evaluate (default: RUNS_DIR/NAME)")
    p.add_argument("--checkpoint", help="best, latest, or a checkpoint folder")
    p.add_argument("--data", nargs="+", help="score these files (txt, md, jsonl[.gz|.zst]) too")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="print a table comparing these runs")

    p = sub.add_parser("generate", help="sample text: one-shot with --prompt, else an interactive prompt")
    _common(p)
    p.add_argument("--run", help="run folder (default: RUNS_DIR/NAME)")
    p.add_argument("--checkpoint", help="best, latest, or a checkpoint folder")
    p.add_argument("--prompt", help="prompt text; without it an interactive session starts")
    p.add_argument("--device", help="cpu, cuda, ... (default: best available)")
    p.add_argument("--compile", action="store_true", help="compile the decode step (CUDA graphs on GPUs)")
    p.add_argument("--int8", action="store_true",
                   help="weight-only int8 block matmuls (torchao): half their bytes per token; "
                        "`antimatter eval` with eval.int8=true measures the perplexity it costs")
    _sampling(p)

    p = sub.add_parser("export", help="write a Hugging Face folder (config.json, safetensors, tokenizer)")
    _common(p)
    p.add_argument("--run", help="run folder (default: RUNS_DIR/NAME)")
    p.add_argument("--checkpoint", default="best", help="best, latest, or a checkpoint folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", default="fp32", choices=DTYPE_NAMES)

    p = sub.add_parser("import", help="load a local Hugging Face model folder into a new run")
    _common(p)
    p.add_argument("--hf", required=True, help="local folder with config.json and weights")
    p.add_argument("--out", required=True, help="run folder to create")

    p = sub.add_parser("pipeline", help="run every stage in order, skipping those already current")
    _common(p)
    p = sub.add_parser("quickstart", help="the whole pipeline on the embedded corpus, tiny model, CPU")
    _common(p)

    p = sub.add_parser("info", help="parameter count, FLOPs per token and memory of a model config")
    _common(p)
    p.add_argument("--model", help="model preset (e.g. seed-300m); default: the config's model")
    p.add_argument("--gpu", help="plan for this GPU (H100, H200, A100-80GB, A100-40GB, L4, T4, V100)")
    p.add_argument("--micro-batch", type=int, help="micro-batch size for the memory estimate")
    p.add_argument("--tokens", type=float, help="estimate the time to train on this many tokens")
    return parser


def split_paths_and_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """KEY=VALUE items are overrides unless a file of that name exists (a path may contain '=')."""
    overrides = [a for a in items if "=" in a and not _exists(a)]
    return [a for a in items if a not in overrides], overrides


def _exists(path: str) -> bool:
    try:
        return Path(path).exists()
    except OSError:  # e.g. a name longer than the file system allows: not an existing file
        return False


def load_run_config(args: argparse.Namespace, overrides: list[str]):
    from antimatter.config import load_config

    extra = []
    if getattr(args, "name", None):
        extra.append(f"name={args.name}")
    if getattr(args, "runs_dir", None):
        extra.append(f"runs_dir={args.runs_dir}")
    if getattr(args, "model", None) and args.command == "info":
        extra.append(f"model={args.model}")
    return load_config(args.config, [*extra, *overrides])


def dispatch(args: argparse.Namespace) -> int:
    from antimatter import pipeline

    paths, overrides = split_paths_and_overrides(args.args)
    if paths and args.command != "prepare":
        raise UserError(f"unexpected argument '{shorten(paths[0])}': overrides look like section.key=value")
    if args.command == "quickstart":
        extra = [f"name={args.name}"] if args.name else []
        extra += [f"runs_dir={args.runs_dir}"] if args.runs_dir else []
        return pipeline.quickstart([*extra, *overrides], config_path=args.config, force=args.force)
    if getattr(args, "data", None):  # `--data` swallows what follows it: give back the overrides
        overrides += [d for d in args.data if "=" in d and not Path(d).exists()]
        args.data = [d for d in args.data if d not in overrides]
    run_arg = getattr(args, "run", None)
    if run_arg and not args.config and (Path(run_arg) / "config.yaml").is_file():
        args.config = str(Path(run_arg) / "config.yaml")  # evaluate / sample a run with its own settings
    cfg = load_run_config(args, overrides)
    cmd = args.command
    if cmd == "info":
        from antimatter.info import print_info

        print_info(cfg, gpu=args.gpu, micro_batch=args.micro_batch, tokens=args.tokens)
        return 0
    if cmd == "prepare":
        return pipeline.cmd_prepare(cfg, paths, out=args.out, workers=args.workers,
                                    keep_rejects=args.keep_rejects, strict=args.strict, force=args.force)
    if cmd in ("tokenizer", "tokenize"):
        pipeline.run_stage(cmd, cfg, force=args.force)
        return 0
    if cmd == "train":
        if args.resume:
            cfg.train.resume = args.resume
        pipeline.run_stage("train", cfg, force=args.force)
        return 0
    if cmd == "pipeline":
        pipeline.run_pipeline(cfg, force=args.force)
        return 0
    run_dir = Path(args.run) if getattr(args, "run", None) else cfg.run_dir
    if cmd == "eval":
        if args.compare:
            from antimatter.eval.report import compare_runs

            print(compare_runs([Path(r) for r in args.compare]))
            return 0
        from antimatter.eval.report import run_eval

        run_eval(cfg, run_dir, checkpoint=args.checkpoint, data_files=args.data)
        return 0
    if cmd == "generate":
        from antimatter.config import SampleConfig, check_value
        from antimatter.generate_cli import run_generate

        for key in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed"):
            if getattr(args, key) is not None:  # the option is checked as its config key is, named as typed
                check_value(SampleConfig, key, getattr(args, key), "--" + key.replace("_", "-"))
                setattr(cfg.generate, key, getattr(args, key))
        return run_generate(cfg, run_dir, prompt=args.prompt, checkpoint=args.checkpoint or "best",
                            device=args.device, compile=args.compile, int8=args.int8)
    if cmd == "export":
        from antimatter.export import export_hf

        export_hf(run_dir, Path(args.out), checkpoint=args.checkpoint, dtype=args.dtype)
        return 0
    if cmd == "import":
        from antimatter.export import import_hf

        import_hf(Path(args.hf), Path(args.out))
        return 0
    raise UserError(f"unknown command '{cmd}'")


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
