"""One typed configuration for every stage: dataclasses, YAML loading, dotted overrides, validation.

A run is described by a single `RunConfig`. It is built from (in order) the defaults below, an optional
YAML file (`--config FILE.yaml`) and dotted command-line overrides (`train.lr=3e-4 model.n_layer=12`; the
CLI's options are aliases of such keys, e.g. `--workers 4` is `data.workers=4`).

Every value is checked here, once, when the config is loaded (`validate`): its type (a `Literal` names the
choices), its range (`BOUNDS`), a device it names, and the rules that tie several fields together. Every
mistake raises `ConfigError` with a one-line message that names the key, the value and the fix; the CLI
prints it without a traceback.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import functools
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from antimatter.errors import UserError, shorten


class ConfigError(UserError, ValueError):
    """A configuration problem the user can fix; the message says how."""


def _short(value: Any) -> str:
    return shorten(repr(value))


MAX_YAML_DEPTH = 32  # a config nests four levels (data: sources: - path:); deeper is a mistake or an attack


class YAMLTooDeep(ConfigError):
    """YAML nested deeper than MAX_YAML_DEPTH: refused while composing, before Python's recursion limit."""


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases: a config has no use for them, and a few hundred bytes of nested aliases expand
    to gigabytes (a "billion laughs"). Nesting is bounded too: the composer recurses once per level."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            raise ConfigError(f"YAML aliases (*{self.peek_event().anchor}) are not allowed in a config: write the "
                              f"value out in full")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise YAMLTooDeep(f"YAML nested deeper than {MAX_YAML_DEPTH} levels: a config needs a few, "
                                  f"flatten it")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        """A key written twice in one mapping is refused: YAML would keep the last one without a word."""
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool):
                continue  # a list or mapping as a key: the base class refuses it
            if key in seen:
                raise ConfigError(f"'{key}' is written twice in one section (again at line "
                                  f"{key_node.start_mark.line + 1}): keep one")
            seen.add(key)
        return super().construct_mapping(node, deep)


def yaml_load(text: str) -> Any:
    """Parse config YAML: safe types only, no aliases."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)


# ------------------------------------------------------------------------------------------- choices

# The settings that take one of a few names. Any other value is refused at load time with one line naming
# the key, the value and these choices, in this order.
Arch = Literal["gpt2", "llama"]
Norm = Literal["auto", "layernorm", "rmsnorm"]
Position = Literal["auto", "learned", "rope"]
Activation = Literal["auto", "gelu", "swiglu", "relu2"]  # relu2: ReLU squared (modded-nanogpt's MLP)
SourceFormat = Literal["auto", "text", "jsonl", "parquet", "hf", "html", "default"]
RuleSet = Literal["auto", "prose", "code", "reference", "none"]  # the quality rules that judge a source
Dtype = Literal["auto", "bf16", "fp16", "fp32"]  # a compute precision (device.resolve_dtype: one policy)
StorageDtype = Literal["fp32", "fp16", "bf16"]  # precisions every command accepts; device.DTYPES maps them
Parallel = Literal["ddp", "fsdp"]
Optimizer = Literal["adamw", "muon"]  # muon: Muon for the blocks' matrices, AdamW for everything else
Schedule = Literal["cosine", "linear", "constant", "wsd"]
Attention = Literal["auto", "flash", "cudnn", "efficient", "math"]  # the preferred SDPA kernel
Recipe = Literal["modern", "gpt2"]  # the defaults a config starts from (RECIPES)

NORMS, POSITIONS, ACTIVATIONS = typing.get_args(Norm), typing.get_args(Position), typing.get_args(Activation)
ATTENTION_BACKENDS = typing.get_args(Attention)
DTYPE_NAMES = typing.get_args(StorageDtype)

DEVICE_HINT = "use auto, cpu, cuda, cuda:N or mps"


def check_device(value: str, key: str) -> None:
    """Refuse a device other than those AntiMatter runs on. Torch parses more names (xla, hpu, meta, ...),
    but the trainer, eval and generate know only these: the others fail later with a traceback."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise ConfigError(f"{key} {_short(value)} is not a device AntiMatter runs on: {DEVICE_HINT}")


# a device name: auto | cpu | cuda | cuda:N | mps (the checker in the annotation runs at load time)
Device = Annotated[str, check_device]


# --------------------------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    """Shape of the Transformer. `arch` picks GPT-2 style (LayerNorm, learned positions, GELU, biases)
    or Llama style (RMSNorm, RoPE, SwiGLU, no biases, optional QK-norm) blocks from the same code."""

    preset: str | None = None
    arch: Arch = "gpt2"
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # grouped-query attention (llama); None = n_head
    d_model: int = 768
    d_ff: int | None = None  # None: 4*d_model (gpt2) or SwiGLU's 8/3*d_model rounded to 64 (llama)
    vocab_size: int = 50257
    block_size: int = 1024  # maximum context length
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    qk_norm: bool = False
    pad_vocab_multiple: int = 64  # embedding rows padded internally for fast matmuls; never exported
    init_std: float = 0.02
    # the block's parts one by one (auto = what `arch` implies), so each change can be measured on its own
    norm: Norm = "auto"
    position: Position = "auto"
    activation: Activation = "auto"
    zero_init_proj: bool = False  # residual projections start at zero: each block starts as the identity
    logit_softcap: float = 0.0  # >0: logits = c * tanh(logits / c) (Gemma 2, modded-nanogpt); 0 = off

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def norm_type(self) -> str:
        return ("rmsnorm" if self.arch == "llama" else "layernorm") if self.norm == "auto" else self.norm

    @property
    def position_type(self) -> str:
        return ("rope" if self.arch == "llama" else "learned") if self.position == "auto" else self.position

    @property
    def activation_type(self) -> str:
        return ("swiglu" if self.arch == "llama" else "gelu") if self.activation == "auto" else self.activation

    @property
    def is_family_standard(self) -> bool:
        """True when the blocks are exactly GPT-2's or Llama's (what export and the decode kernels know)."""
        family = ModelConfig(arch=self.arch)
        return (self.norm_type, self.position_type, self.activation_type) == (
            family.norm_type, family.position_type, family.activation_type) and not self.logit_softcap

    @property
    def ffn_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.activation_type == "swiglu":  # two input matrices: 8/3 d keeps the parameters of 4 d
            return 64 * ((int(8 * self.d_model / 3) + 63) // 64)
        return 4 * self.d_model

    @property
    def padded_vocab_size(self) -> int:
        m = max(1, self.pad_vocab_multiple)
        return ((self.vocab_size + m - 1) // m) * m


# Model sizes. A preset fixes the shape; the recipe (RECIPES) fills in the blocks' kind unless the preset names it.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # for unit tests: runs in milliseconds
    "tiny": dict(n_layer=2, n_head=2, d_model=32, block_size=64, vocab_size=512),
    # for `antimatter quickstart` on 2 CPU cores: learns real structure in about two minutes
    "quickstart": dict(n_layer=4, n_head=4, d_model=128, block_size=128, vocab_size=4096),
    "gpt2-124m": dict(n_layer=12, n_head=12, d_model=768, block_size=1024, vocab_size=50257),
    # the seed project's model: 24 layers, d 1024, 16 heads, vocab 50,257, context 2,048 (with recipe=gpt2:
    # tied, GELU, pre-LN LayerNorm, exactly the seed's)
    "seed-300m": dict(n_layer=24, n_head=16, d_model=1024, block_size=2048, vocab_size=50257),
    "llama-tiny": dict(arch="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=64, block_size=64,
                       vocab_size=512, bias=False, tie_embeddings=False, qk_norm=True),
    "llama-300m": dict(arch="llama", n_layer=24, n_head=16, n_kv_head=8, d_model=1024, block_size=2048,
                       vocab_size=50257, bias=False, tie_embeddings=False),
    "seed-1.3b": dict(n_layer=24, n_head=16, d_model=2048, block_size=2048, vocab_size=50257),
}


# The defaults a config starts from, under its model preset and its own settings (`recipe: gpt2` for the seed's).
# gpt2: the dataclasses' own defaults: GPT-2 blocks (LayerNorm, learned positions, GELU, biases, tied
#   embeddings), AdamW, warm-up + cosine.
# modern: what won per GPU-minute (docs/RESULTS.md, "Recipes"): Llama blocks (RMSNorm, RoPE, SwiGLU, no biases)
#   with QK-norm, zero-initialised residual projections and an untied head, Muon for the blocks' matrices with
#   AdamW for the rest, warm-up / stable / decay. SwiGLU without logit soft-capping: the variant a
#   transformers class (Qwen3) loads, so `antimatter export` works for every default run.
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "gpt2": {"model": {}, "train": {}},
    "modern": {
        "model": dict(arch="llama", bias=False, qk_norm=True, zero_init_proj=True, tie_embeddings=False),
        "train": dict(optimizer="muon", muon_lr=0.02, lr=0.004, embed_lr=0.2, schedule="wsd", warmup_steps=10,
                      decay_fraction=0.4, min_lr_ratio=0.0, weight_decay=0.0, beta1=0.8, grad_clip=0.0),
    },
}


# ---------------------------------------------------------------------------------------------- data


@dataclass
class SourceConfig:
    """One named input: a file, folder, glob, or `default` (the embedded corpus that needs no download)."""

    path: str = "default"
    name: str | None = None
    format: SourceFormat = "auto"
    text_field: str = "text"
    rules: RuleSet = "auto"
    nfc: bool = True
    fix_mojibake: bool = True
    strip_control: bool = True
    collapse_whitespace: bool = True
    max_bytes: int = 0  # 0 = no cap; otherwise stop reading this source after this many text bytes


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    num_perm: int = 128
    threshold: float = 0.8  # Jaccard similarity above which two documents are near-duplicates
    shingle: int = 5  # word n-gram size
    verify: bool = True  # confirm LSH candidates with the estimated Jaccard before removing


@dataclass
class FilterConfig:
    """Thresholds of the named quality rules (see antimatter.data.filters for the rule sets).

    A document fails a rule when its measure is outside the bound; the first failing rule is the one it is
    counted under. `disable` switches rules off by name everywhere (e.g. `[fineweb_short_lines]`)."""

    enabled: bool = True
    disable: list[str] = field(default_factory=list)
    min_words: int = 5
    max_words: int = 10_000_000  # 0 = no limit (as for every size cap here)
    max_doc_bytes: int = 20_000_000  # 0 = no limit
    # ratios over a handful of words or lines are noise: shorter documents (quotes, entries, sonnets) are
    # judged by the length, word-length, alphabetic and lorem-ipsum rules only
    short_doc_words: int = 50
    dup_min_chars: int = 30  # lines/paragraphs shorter than this (headings, speaker names) are not counted
    # Gopher's thresholds were set on web pages; in a whole book common phrases repeat by chance, so the
    # n-gram repetition rules judge long documents window by window (mean over windows of this many words)
    repetition_window_words: int = 10_000
    # technical documentation: in markdown the prose rules judge the prose (fenced code blocks go to the code
    # rules; tables, headings, link targets and HTML tags are structure), and the n-gram repetition rules read
    # each distinct line once (API docs repeat "Availability: Unix" after every function: whole repeated
    # lines are the line rules' to judge, not counted again as repeated n-grams)
    markdown_aware: bool = True
    ngram_distinct_lines: bool = True
    # prose: Gopher quality
    min_mean_word_len: float = 3.0
    max_mean_word_len: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines: float = 0.9
    max_ellipsis_lines: float = 0.3
    min_alpha_words: float = 0.8
    min_stop_words: int = 2
    # prose: Gopher repetition
    max_dup_line_frac: float = 0.3
    max_dup_para_frac: float = 0.3
    max_dup_line_chars: float = 0.2
    max_dup_para_chars: float = 0.2
    max_top_ngram_chars: list[float] = field(default_factory=lambda: [0.20, 0.18, 0.16])  # n = 2, 3, 4
    max_dup_ngram_chars: list[float] = field(
        default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10])  # n = 5..10
    # prose: C4 / FineWeb
    min_terminal_punct_lines: float = 0.12
    max_short_lines: float = 0.67
    # ... and those short lines hold more than this share of the characters: a menu or an index is short
    # lines only, a reference page's tables and option names are short lines beside long descriptions
    # (0 = the share of lines alone decides, as in FineWeb)
    max_short_line_chars: float = 0.5
    max_newline_word_ratio: float = 0.3
    # code (StarCoder / Codex style)
    code_max_line_len: int = 1000  # 0 = no limit
    code_max_mean_line_len: float = 100.0
    code_min_alnum_frac: float = 0.25
    code_max_dup_line_frac: float = 0.7
    # reference (dictionaries, glossaries, manuals)
    ref_min_alpha_words: float = 0.5
    ref_min_mean_word_len: float = 2.0
    ref_max_mean_word_len: float = 15.0
    ref_max_dup_line_frac: float = 0.6


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    default_corpus_bytes: int = 16_000_000  # byte budget of the embedded corpus
    val_fraction: float = 0.02  # of each source's bytes, held out for validation (data/split.py)
    seed: int = 1234
    workers: int = 0  # 0 = all cores
    shard_docs: int = 50_000
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    keep_rejects: bool = False
    strict: bool = False
    # a folder `antimatter prepare PATH... --out DIR` wrote: the tokenizer, tokenize and eval stages read it
    # instead of RUN/data, and the pipeline does not prepare (the folder is only read). "" = RUN/data
    prepared: str = ""


# -------------------------------------------------------------------------------------------- tokens


EOT = "<|endoftext|>"  # the document separator every tokenizer has, listed in special_tokens or not


@dataclass
class TokenizerConfig:
    vocab_size: int = 0  # 0 = model.vocab_size
    min_frequency: int = 2
    train_bytes: int = 200_000_000  # bounded deterministic sample of the train split used to learn merges (0 = all)
    special_tokens: list[str] = field(default_factory=lambda: [EOT])
    # `tokenizer.from: PATH` (the YAML key is `from`): adopt this tokenizer instead of learning one. PATH is a
    # tokenizer.json, a Hugging Face folder holding one, or a run folder (RUN/tokenizer/tokenizer.json, e.g.
    # one `antimatter import` made). It must be a byte-level BPE with an end-of-text token; the vocab size is
    # its own (the keys above are unused) and must fit model.vocab_size. "" = learn a BPE on the train split.
    from_: str = ""


@dataclass
class TokenizeConfig:
    shard_tokens: int = 100_000_000  # tokens per .bin shard (200 MB at uint16)
    workers: int = 0  # encoder threads; 0 = all cores (sets RAYON_NUM_THREADS before the first encode)
    batch_docs: int = 512  # documents encoded together (parallel across documents) ...
    batch_bytes: int = 2_000_000  # ... or this many input bytes, whichever comes first (bounds memory)


# --------------------------------------------------------------------------------------------- train


@dataclass
class TrainConfig:
    device: Device = "auto"
    dtype: Dtype = "auto"
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend (eager / aot_eager to debug compile problems)
    # inductor's coordinate-descent tuning of the kernels it generates: +2.3% tokens/s on seed-300m (one H200,
    # docs/RESULTS.md) for a few more minutes of compiling at start-up
    compile_tuning: bool = False
    parallel: Parallel = "ddp"  # only matters with several processes
    activation_checkpointing: bool = False
    seq_len: int = 0  # 0 = model.block_size
    micro_batch_size: int = 8
    global_batch_tokens: int = 0  # 0 = micro_batch * seq_len * world (no accumulation)
    max_steps: int = 1000
    # >0: train for this many minutes (compile and evaluation not counted): the step count is fixed from the
    # first steps' measured time so that the schedule's decay ends when the time does (max_steps is ignored)
    max_minutes: float = 0.0
    budget_evals: int = 20  # with max_minutes: measure val loss this many times, evenly over the budget
    optimizer: Optimizer = "adamw"
    lr: float = 6e-4  # AdamW's learning rate (with muon: the embeddings, head, norms and biases)
    embed_lr: float = 0.0  # AdamW's rate for the input embeddings of an untied model (0 = lr)
    muon_lr: float = 0.02  # Muon's learning rate (scaled by sqrt(max(1, rows/cols)) per matrix)
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: Schedule = "cosine"
    decay_fraction: float = 0.2  # wsd: the last fraction of max_steps decays linearly to lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 200
    eval_steps: int = 20
    log_interval: int = 10
    ckpt_interval: int = 500
    keep_last: int = 3
    seed: int = 1337
    resume: str = "auto"  # auto | none | PATH
    max_nonfinite: int = 5
    max_time_s: float = 0.0  # 0 = no wall-time limit; else stop (and checkpoint) after this many seconds
    stop_step: int = 0  # >0: stop (and checkpoint) after this step; the schedule still runs to max_steps
    init_from: str = ""  # a checkpoint or Hugging Face folder to start from
    tensorboard: bool = True
    loss_chunk_tokens: int = 0  # >0: head + cross-entropy fused, this many tokens a chunk (no full logits)
    attention: Attention = "auto"
    fp8: bool = False  # torchao float8 matmuls in the blocks (Ada/Hopper GPUs, needs torchao)


@dataclass
class SampleConfig:
    """Sampling settings shared by eval's sample generations and `antimatter generate`."""

    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    seed: int = 42


@dataclass
class GenerateConfig(SampleConfig):
    """`antimatter generate`: the sampling settings, and where and how the model runs."""

    seed: int | None = None  # null: a new seed for each sample, printed with it (eval's samples keep theirs)
    checkpoint: str = "best"  # best | latest | PATH
    device: Device | None = None  # null: train.device, as for the run's training
    compile: bool = False  # compile the decode step (CUDA graphs on GPUs)
    int8: bool = False  # weight-only int8 block matmuls (torchao): half their bytes per token
    threads: int = 0  # CPU threads while decoding; 0 = auto (one for a small model's few rows, else torch's)


@dataclass
class ExportConfig:
    """`antimatter export`: which checkpoint, stored in which precision."""

    checkpoint: str = "best"  # best | latest | PATH
    dtype: StorageDtype = "fp32"


@dataclass
class EvalConfig:
    checkpoint: str = "best"  # best | latest | PATH
    prompts: list[str] = field(default_factory=lambda: [
        "The future of artificial intelligence",
        "In the field of machine learning",
        "Scientists have discovered",
    ])
    sample: SampleConfig = field(default_factory=SampleConfig)
    max_eval_tokens: int = 0  # 0 = all val tokens
    stride: int = 0  # sliding-window stride; 0 = seq_len (non-overlapping windows)
    batch_size: int = 8
    continuation_docs: int = 32
    prefix_tokens: int = 32
    continuation_tokens: int = 32
    speed: bool = True
    device: Device = "auto"  # auto: cuda if available, else cpu
    dtype: Dtype = "auto"  # autocast as in training
    text_field: str = "text"  # field holding the text in JSON Lines files given to --data
    seed: int = 1234  # choice of continuation documents and generation seed
    continuation_temperature: float = 0.0  # 0 = greedy continuations
    speed_batch: int = 8  # the larger decode batch of the speed test (batch 1 is always measured)
    speed_prompt_tokens: int = 0  # 0 = half the context
    speed_new_tokens: int = 32
    speed_compile: bool = False  # also time the compiled (CUDA graphs) decode step; compiling takes a while
    by_source: bool = True  # also score the prepared val documents per source (data/val/*.jsonl.zst)
    unigram: bool = True  # unigram perplexity of the val tokens (counts from the train split) as a baseline
    plots: bool = True
    int8: bool = False  # also score (and time) a weight-only int8 copy (torchao): the perplexity it costs


@dataclass
class RunConfig:
    # the defaults the model and train sections start from (RECIPES). A loaded config (load_config,
    # config_from_dict) starts from `modern` unless it names gpt2; these dataclasses' own defaults are gpt2's
    recipe: Recipe = "gpt2"
    name: str = "default"
    runs_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    @property
    def data_dir(self) -> Path:
        """The prepared data the later stages read: `data.prepared`, or the run's own data folder."""
        return self.data_dir_of(self.run_dir)

    def data_dir_of(self, run_dir: str | Path) -> Path:
        """The prepared data of this run when it lives at `run_dir` (a run folder may have been moved)."""
        return Path(self.data.prepared) if self.data.prepared else Path(run_dir) / "data"

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or self.model.block_size

    @property
    def tokenizer_vocab_size(self) -> int:
        return self.tokenizer.vocab_size or self.model.vocab_size


# ------------------------------------------------------------------------------------------- ranges


@dataclass(frozen=True)
class Bound:
    """The valid values of a numeric setting (bounds inclusive unless open); `note` says what a special value
    means, e.g. "0 = off"."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    note: str = ""

    def contains(self, v: float) -> bool:
        above = self.low is None or v > self.low or (v == self.low and not self.open_low)
        below = self.high is None or v < self.high or (v == self.high and not self.open_high)
        return above and below

    def describe(self, integer: bool) -> str:
        if self.high is not None:
            text = (f"in {'(' if self.open_low else '['}{_num(self.low or 0)}, {_num(self.high)}"
                    f"{')' if self.open_high else ']'}")
        elif (self.low == 0 and self.open_low) or (integer and self.low == 1):
            text = "positive"
        else:
            text = f"{'>' if self.open_low else '>='} {_num(self.low or 0)}"
        return f"{text} ({self.note})" if self.note else text


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


NONNEG, POSITIVE, FRACTION = Bound(0), Bound(0, open_low=True), Bound(0, 1)
COUNT = Bound(1)  # a positive integer
SEED = Bound(0, 2**63 - 1)  # what torch, numpy and xxhash all take (eval derives seed + i)
BELOW_ONE = Bound(0, 1, open_high=True)
OFF, NO_LIMIT = Bound(0, note="0 = off"), Bound(0, note="0 = no limit")

# The valid range of every int and float setting, by section. `validate` checks each one (type, finiteness,
# range) before any work, and tests/test_bad_values.py checks that no numeric setting is missing here.
BOUNDS: dict[type, dict[str, Bound]] = {
    ModelConfig: dict(
        n_layer=COUNT, n_head=COUNT, n_kv_head=Bound(1, note="null = n_head"), d_model=COUNT,
        d_ff=Bound(1, note="null = the default"), vocab_size=COUNT, block_size=COUNT, dropout=BELOW_ONE,
        norm_eps=POSITIVE, rope_theta=POSITIVE, init_std=NONNEG, logit_softcap=OFF,
        pad_vocab_multiple=Bound(0, 2**16, note="0 or 1 = no padding")),
    SourceConfig: dict(max_bytes=Bound(0, note="0 = no cap")),
    DedupConfig: dict(num_perm=Bound(2), threshold=Bound(0, 1, open_low=True), shingle=COUNT),
    FilterConfig: dict(
        min_words=NONNEG, max_words=NO_LIMIT, max_doc_bytes=NO_LIMIT, short_doc_words=NONNEG,
        dup_min_chars=NONNEG, repetition_window_words=Bound(0, note="0 = the whole document"),
        min_mean_word_len=NONNEG, max_mean_word_len=NONNEG, max_symbol_word_ratio=NONNEG,
        max_bullet_lines=FRACTION, max_ellipsis_lines=FRACTION, min_alpha_words=FRACTION,
        min_stop_words=NONNEG, max_dup_line_frac=FRACTION, max_dup_para_frac=FRACTION,
        max_dup_line_chars=FRACTION, max_dup_para_chars=FRACTION, max_top_ngram_chars=FRACTION,
        max_dup_ngram_chars=FRACTION, min_terminal_punct_lines=FRACTION, max_short_lines=FRACTION,
        max_short_line_chars=FRACTION, max_newline_word_ratio=NONNEG, code_max_line_len=NO_LIMIT,
        code_max_mean_line_len=NONNEG, code_min_alnum_frac=FRACTION, code_max_dup_line_frac=FRACTION, ref_min_alpha_words=FRACTION,
        ref_min_mean_word_len=NONNEG, ref_max_mean_word_len=NONNEG, ref_max_dup_line_frac=FRACTION),
    DataConfig: dict(
        default_corpus_bytes=COUNT, val_fraction=Bound(0, 1, open_low=True, open_high=True), seed=SEED,
        workers=Bound(0, note="0 = all cores"), shard_docs=COUNT),
    TokenizerConfig: dict(vocab_size=Bound(0, note="0 = model.vocab_size"), min_frequency=NONNEG,
                          train_bytes=Bound(0, note="0 = all")),
    TokenizeConfig: dict(shard_tokens=COUNT, workers=Bound(0, note="0 = all cores"), batch_docs=COUNT,
                         batch_bytes=COUNT),
    TrainConfig: dict(
        seq_len=Bound(0, note="0 = model.block_size"), micro_batch_size=COUNT,
        global_batch_tokens=Bound(0, note="0 = no accumulation"), max_steps=NONNEG, max_minutes=OFF,
        budget_evals=NONNEG, lr=POSITIVE, embed_lr=Bound(0, note="0 = lr"), muon_lr=NONNEG,
        muon_momentum=BELOW_ONE, muon_weight_decay=NONNEG, min_lr_ratio=FRACTION, warmup_steps=NONNEG,
        decay_fraction=FRACTION, weight_decay=NONNEG, beta1=BELOW_ONE, beta2=BELOW_ONE, grad_clip=OFF,
        eval_interval=OFF, eval_steps=NONNEG, log_interval=NONNEG,
        ckpt_interval=Bound(0, note="0 = at the end only"), keep_last=Bound(0, note="0 = keep all"), seed=SEED,
        max_nonfinite=COUNT, max_time_s=NO_LIMIT, stop_step=OFF, loss_chunk_tokens=OFF),
    SampleConfig: dict(
        max_new_tokens=NONNEG, temperature=Bound(0, note="0 = greedy"), top_k=OFF, top_p=FRACTION,
        repetition_penalty=Bound(0, open_low=True, note="1 = off"), seed=SEED),
    EvalConfig: dict(
        max_eval_tokens=Bound(0, note="0 = all"), stride=Bound(0, note="0 = default"), batch_size=COUNT,
        continuation_docs=Bound(0, note="0 = default"), prefix_tokens=COUNT, continuation_tokens=COUNT,
        seed=SEED, continuation_temperature=Bound(0, note="0 = greedy"), speed_batch=COUNT,
        speed_prompt_tokens=Bound(0, note="0 = default"), speed_new_tokens=COUNT),
}
BOUNDS[GenerateConfig] = {**BOUNDS[SampleConfig], "threads": Bound(0, note="0 = auto")}


_hints = functools.cache(typing.get_type_hints)
_annotations = functools.cache(functools.partial(typing.get_type_hints, include_extras=True))


def check_value(cls: type, name: str, value: Any, key: str) -> None:
    """Refuse a value of setting `cls.name` that is of the wrong type, not finite or out of its range (a
    ConfigError naming `key`: the dotted key, or the option or command it came from)."""
    bound = BOUNDS[cls][name]
    tp = _hints(cls)[name]
    if value is None and type(None) in typing.get_args(tp):
        return
    integer = int in (tp, *typing.get_args(tp))
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        raise ConfigError(f"{key} must be {'an integer' if integer else 'a number'}, got {_short(value)}")
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {_short(value)}")
    if not bound.contains(value):
        raise ConfigError(f"{key} must be {bound.describe(integer)}, got {_short(value)}")


# ------------------------------------------------------------------------------- one setting at a time


def _plain(tp: Any) -> Any:
    """An annotation without its `| None` (the config's only unions)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    return tp


def _either(choices: tuple) -> str:
    """'a, b or c'."""
    names = [str(c) for c in choices]
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


def check_field(cls: type, name: str, value: Any, key: str) -> None:
    """One setting on its own, as its annotation and range say: one of its `Literal` choices, accepted by the
    checker in its `Annotated` type (a device), within its range in BOUNDS (each item of a list). `key` names
    it in the error: the dotted key, or the option it came from."""
    tp = _annotations(cls)[name]
    if value is None and type(None) in typing.get_args(tp):
        return
    tp = _plain(tp)
    if typing.get_origin(tp) is Literal and value not in typing.get_args(tp):
        raise ConfigError(f"{key} must be {_either(typing.get_args(tp))}, got {_short(value)}")
    for check in getattr(tp, "__metadata__", ()):
        check(value, key)
    if name in BOUNDS.get(cls, {}):
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            check_value(cls, name, item, key if i is None else f"{key}[{i}]")


def check_fields(section: Any, prefix: str = "") -> None:
    """`check_field` for every setting of a section and of the sections (and lists of them) inside it."""
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), f"{prefix}{key_name(f.name)}"
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{key}.")
        elif isinstance(value, list) and any(dataclasses.is_dataclass(v) for v in value):
            for i, v in enumerate(value):
                check_fields(v, f"{key}[{i}].")
        else:
            check_field(type(section), f.name, value, key)


def setting(key: str) -> tuple[type, str]:
    """(the section class, the field name) of a dotted key such as `generate.top_k`."""
    cls, parts = RunConfig, key.split(".")
    for i, part in enumerate(parts):
        if field_name(part) not in {f.name for f in dataclasses.fields(cls)}:
            raise _unknown_key(cls, part, "".join(f"{p}." for p in parts[:i]))
        if i < len(parts) - 1:
            cls = _plain(_hints(cls)[field_name(part)])
            if not dataclasses.is_dataclass(cls):
                raise ConfigError(f"'{'.'.join(parts[:i + 1])}' is not a section")
    return cls, field_name(parts[-1])


def setting_type(key: str) -> Any:
    """The annotation of a dotted key, without `| None`: a Literal, Annotated[str, ...], int, a section..."""
    cls, name = setting(key)
    return _plain(_annotations(cls)[name])


def check_setting(key: str, value: Any, label: str | None = None) -> None:
    """`check_field` for one typed value of a dotted key, before it is set (a CLI option, named `label`)."""
    cls, name = setting(key)
    check_field(cls, name, value, label or key)


# ------------------------------------------------------------------------------------------- build


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Turn a YAML/CLI value into the annotated type, or raise a ConfigError naming the key. (Which of its
    choices a Literal takes, and its range, are `validate`'s: it checks the whole config the same way.)"""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(tp), key)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {_type_name(tp)} fields, got {_short(value)}")
        return _build(tp, value, key)
    if origin is list:
        return _coerce_list(value, (typing.get_args(tp) or (Any,))[0], key)
    if origin is Literal:
        return _coerce(value, type(typing.get_args(tp)[0]), key)
    scalar = _SCALARS.get(tp)
    return scalar(value, key) if scalar else value


def _coerce_union(value: Any, args: tuple, key: str) -> Any:
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if type(None) in args:
            return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, key)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[0] if errors else f"{key}: bad value {_short(value)}")


def _coerce_list(value: Any, item_tp: Any, key: str) -> list:
    if isinstance(value, str):
        # one string is one item (prompts contain commas); other lists may be given as "1,2,3"
        value = [value] if item_tp is not int and item_tp is not float else [v for v in value.split(",") if v]
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{key}: expected a list, got {_short(value)}")
    return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]


def _to_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
        return value.lower() in ("true", "yes", "1", "on")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"{key}: expected true or false, got {_short(value)}")


def _to_int(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value.replace("_", ""))
        with contextlib.suppress(ValueError):
            if float(value).is_integer():  # YAML reads 1e3 as a string
                return int(float(value))
    raise ConfigError(f"{key}: expected an integer, got {_short(value)}")


def _to_float(value: Any, key: str) -> float:
    number = None
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            number = float(value)
    if number is None:
        raise ConfigError(f"{key}: expected a number, got {_short(value)}")
    if not math.isfinite(number):  # no setting means anything at nan or inf
        raise ConfigError(f"{key}: expected a finite number, got {_short(value)}")
    return number


def _to_str(value: Any, key: str) -> str:
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{key}: expected a string, got {_short(value)}")


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


# settings whose key is a Python keyword: the field is named with a trailing underscore, the YAML and dotted
# key without it (`tokenizer.from`)
KEYWORD_FIELDS = {"from": "from_"}
_KEY_OF_FIELD = {v: k for k, v in KEYWORD_FIELDS.items()}


def field_name(key: str) -> str:
    """The dataclass field of a config key (`from` -> `from_`)."""
    return KEYWORD_FIELDS.get(key, key)


def key_name(name: str) -> str:
    """The config key of a dataclass field (`from_` -> `from`)."""
    return _KEY_OF_FIELD.get(name, name)


def _unknown_key(cls: type, key: Any, prefix: str) -> ConfigError:
    names = [key_name(f.name) for f in dataclasses.fields(cls)]
    key = str(key)  # YAML keys may be numbers (`1: 2`)
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(names)}"
    return ConfigError(f"unknown config key '{prefix}{key}': {hint}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    field_names = {f.name for f in dataclasses.fields(cls)}
    for k, v in data.items():
        name = field_name(k) if isinstance(k, str) else k
        if name not in field_names:
            raise _unknown_key(cls, k, f"{prefix}." if prefix else "")
        kwargs[name] = _coerce(v, hints[name], f"{prefix}.{k}" if prefix else k)
    return cls(**kwargs)


def _model_from_dict(data: dict[str, Any] | str | None, recipe: str = "gpt2") -> ModelConfig:
    """A model section may be a preset name (`model: seed-300m`) or a mapping with optional `preset`; it
    starts from the recipe's model defaults, then the preset's fields, then its own."""
    if data is None:
        data = {}
    if isinstance(data, str):
        data = {"preset": data}
    if not isinstance(data, dict):
        raise ConfigError(f"model: expected a preset name or a mapping of ModelConfig fields, got {_short(data)}")
    data = dict(data)
    preset = data.get("preset")
    base = dict(preset_model(preset, recipe).__dict__) if preset is not None else dict(RECIPES[recipe]["model"])
    base.update(data)
    return _build(ModelConfig, base, "model")


def default_model(recipe: str = "modern") -> ModelConfig:
    """The model a config of this recipe gets when it names none."""
    return _model_from_dict(None, recipe)


def recipe_of(data: dict[str, Any]) -> str:
    """The `recipe` of a config mapping (default modern), checked before it picks any defaults."""
    recipe = data.get("recipe", "modern")
    check_field(RunConfig, "recipe", recipe, "recipe")
    return recipe


def preset_model(name: str, recipe: str = "gpt2") -> ModelConfig:
    """The named model preset with a recipe's blocks (default: GPT-2's, what the benchmarks compare with
    nanoGPT and transformers), or a ConfigError that lists the valid names."""
    if not isinstance(name, str):
        raise ConfigError(f"model.preset: expected a preset name ({', '.join(MODEL_PRESETS)}), got {_short(name)}")
    if name not in MODEL_PRESETS:
        close = difflib.get_close_matches(name, list(MODEL_PRESETS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"unknown model preset '{name}': {hint}choose one of {', '.join(MODEL_PRESETS)}")
    return ModelConfig(**{**RECIPES[recipe]["model"], "preset": name, **MODEL_PRESETS[name]})


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    data = dict(data or {})
    recipe = data["recipe"] = recipe_of(data)
    model = _model_from_dict(data.pop("model", None), recipe)
    train = data.get("train")
    if train is None or isinstance(train, dict):  # anything else is refused by _build, naming the section
        data["train"] = {**RECIPES[recipe]["train"], **(train or {})}
    cfg = _build(RunConfig, data)
    cfg.model = model
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A config (or one section) as plain data under its YAML keys (`from_` is written `from`)."""
    return _keys_of_fields(dataclasses.asdict(cfg))


def _keys_of_fields(value: Any) -> Any:
    if isinstance(value, dict):
        return {key_name(k): _keys_of_fields(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_keys_of_fields(v) for v in value]
    return value


# an override: "a.b.c=VALUE" (VALUE read as YAML: 3e-4, true, [1, 2]) or a (dotted key, value) pair, as the CLI
# turns its options into (the value set as it is)
Override = str | tuple[str, Any]


def load_config(path: str | Path | dict[str, Any] | None = None, overrides: list[Override] | None = None
                ) -> RunConfig:
    """Defaults <- YAML file (or a dict of the same sections) <- overrides, then validation."""
    if isinstance(path, dict):
        data = copy.deepcopy(path)  # overrides write into nested sections: the caller's dict stays as given
    else:
        data = read_config_file(path) if path is not None else {}
    # `model=NAME` (or `model.preset=NAME`) first, so a dotted `model.x=...` is never thrown away by a preset
    # given after it
    for item in sorted(overrides or [], key=lambda o: _override_key(o) not in ("model", "model.preset")):
        apply_override(data, item)
    cfg = config_from_dict(data)
    validate(cfg)
    return cfg


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping of sections in a YAML config file, or a one-line ConfigError naming the file."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"--config {p} is a folder: give the YAML file (e.g. {p / 'config.yaml'})")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (check the path given to --config)")
    try:
        loaded = yaml_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                          f"{e.start}): save it as UTF-8") from None
    except ConfigError as e:  # too deep, an alias, a key written twice
        raise ConfigError(f"config file {p}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {p} is not valid YAML{where}: fix the syntax") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections (model:, train:, ...)")
    return loaded


def _override_key(item: Override) -> str:
    key = item[0] if isinstance(item, tuple) else item.split("=", 1)[0] if "=" in item else ""
    return key.replace(" ", "")


def _parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], the value read as a YAML scalar)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value (e.g. train.lr=3e-4)")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if parts == [""]:
        raise ConfigError(f"override '{item}' has an empty key")
    if "" in parts:
        raise ConfigError(f"override '{item}': the key has an empty part between dots: write it like train.lr=3e-4")
    try:
        return parts, yaml_load(raw) if raw.strip() else ""
    except YAMLTooDeep as e:
        raise ConfigError(f"override {'.'.join(parts)}: {e}") from None
    except yaml.YAMLError:
        return parts, raw


def apply_override(data: dict[str, Any], item: Override) -> None:
    """Apply `a.b.c=value` or (`a.b.c`, value) to a nested dict of sections."""
    parts, value = (item[0].split("."), item[1]) if isinstance(item, tuple) else _parse_override(item)
    _refuse_value_for_section(parts, value, item)
    node = data
    if parts == ["model", "preset"]:  # a new preset replaces the whole model section, as `model=NAME` does:
        data["model"] = {"preset": value}  # kept fields of an expanded (saved) config would silently win
        return
    if parts[0] == "model" and isinstance(node.get("model"), str):
        node["model"] = {"preset": node["model"]}
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            shown = item if isinstance(item, str) else f"{item[0]}={item[1]}"
            raise ConfigError(f"override '{shown}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def _refuse_value_for_section(parts: list[str], value: Any, item: Override) -> None:
    """`data=3` would replace a whole section with a number, and the next override of one of its keys would
    then be the one blamed: refuse it here, naming it (`model=NAME`, a preset, is the one section that takes
    a value)."""
    if isinstance(value, dict) or (parts == ["model"] and isinstance(value, str)):
        return
    key = ".".join(parts)
    try:
        kind = setting_type(key)
    except ConfigError:  # an unknown key: validation names it, with the keys it could be
        return
    if dataclasses.is_dataclass(kind):
        shown = item if isinstance(item, str) else f"{item[0]}={item[1]}"
        raise ConfigError(f"override '{shown}': {key} is a section, not a value: set one of its keys "
                          f"(e.g. {key}.{dataclasses.fields(kind)[0].name}=...)")


# ---------------------------------------------------------------------------------------- validation


def validate(cfg: RunConfig) -> None:
    """The one check of a whole config, run when it is loaded: every setting on its own (`check_fields`: its
    choices, range or device), then the rules that tie settings together. Each failure is one line that says
    what to change."""
    _check_name(cfg.name)
    check_fields(cfg)
    _check_model(cfg.model)
    _check_lengths(cfg)
    _check_tokenizer(cfg)
    _check_filters(cfg.data.filters)
    if cfg.train.compile_tuning and not cfg.train.compile:
        raise ConfigError("train.compile_tuning=true tunes the kernels of the compiled model: set "
                          "train.compile=true as well, or leave compile_tuning off")


def _check_name(name: str) -> None:
    if (not name or name in (".", "..") or any(c in name for c in "/\\") or name != name.strip()
            or not name.isprintable()):
        raise ConfigError(f"run name {_short(name)} must be one plain folder name (no '/', '..', control "
                          f"characters or surrounding spaces): the run lives in runs_dir/NAME, so use e.g. --name "
                          f"my-run")


def _check_model(m: ModelConfig) -> None:
    """The shape's parts must fit together (each size is positive by now)."""
    if m.d_model % m.n_head:
        near = _divisor_near(m.d_model, m.n_head)
        raise ConfigError(
            f"model.d_model ({m.d_model}) must be divisible by model.n_head ({m.n_head}): "
            f"change one of them" + (f" (e.g. n_head={near})" if near else ""))
    if m.n_head % m.kv_heads:
        raise ConfigError(f"model.n_head ({m.n_head}) must be divisible by model.n_kv_head ({m.kv_heads})")
    if m.position_type == "rope" and m.head_dim % 2:
        raise ConfigError(f"RoPE needs an even head dimension, got d_model/n_head = {m.head_dim}")


def _check_lengths(cfg: RunConfig) -> None:
    if cfg.seq_len > cfg.model.block_size:
        raise ConfigError(
            f"train.seq_len ({cfg.seq_len}) is longer than the model's context model.block_size "
            f"({cfg.model.block_size}): lower train.seq_len or raise model.block_size")


def _check_tokenizer(cfg: RunConfig) -> None:
    if cfg.tokenizer.from_:  # the adopted file decides the vocab: the tokenizer stage checks it against the model
        return
    vocab, model_vocab = cfg.tokenizer_vocab_size, cfg.model.vocab_size
    if vocab > model_vocab:
        raise ConfigError(f"tokenizer.vocab_size ({vocab}) exceeds model.vocab_size ({model_vocab}): lower "
                          f"tokenizer.vocab_size, or raise model.vocab_size with it")
    least = 256 + len({EOT, *cfg.tokenizer.special_tokens})
    if vocab < least:
        raise ConfigError(f"tokenizer vocab size {vocab} is too small: byte-level BPE needs at least {least} "
                          f"(256 bytes + special tokens): raise tokenizer.vocab_size")


def _check_filters(f: FilterConfig) -> None:
    for name, n, which in (("max_top_ngram_chars", 3, "n = 2, 3, 4"), ("max_dup_ngram_chars", 6, "n = 5..10")):
        if len(getattr(f, name)) != n:
            raise ConfigError(f"data.filters.{name} needs {n} values ({which}), got {len(getattr(f, name))}")
    if f.disable:
        from antimatter.data.filters import ALL_RULES  # here: data.filters imports this module (and numpy)

        unknown = [r for r in f.disable if r not in ALL_RULES]
        if unknown:
            raise ConfigError(f"data.filters.disable names unknown rule(s) {', '.join(unknown)}: "
                              f"valid rules are {', '.join(ALL_RULES)}")


def _divisor_near(n: int, k: int) -> int | None:
    """The divisor of n closest to k (the smaller on a tie), in sqrt(n) steps; None where n is too large for
    that to be quick (a suggestion is not worth a hang)."""
    if n > 10**12:
        return None
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return min([*small, *(n // d for d in small)], key=lambda d: (abs(d - k), d))


def _full_dump(text: bytes, full: dict[str, Any]) -> bool:
    """True for a config file that holds every section, as save_config writes them: one written before the
    header line existed (a user's own config names a few)."""
    try:
        loaded = yaml_load(text.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError, ConfigError):
        return False
    return isinstance(loaded, dict) and list(loaded) == list(full)


SAVED_CONFIG_HEADER = "# antimatter: the settings this run used, overrides included (rewritten by each command)\n"


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config. A file already there that antimatter did not write (no header line: the
    user's own, e.g. the one given with -c) is kept beside it as NAME.orig, never overwritten."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    full = config_to_dict(cfg)
    text = SAVED_CONFIG_HEADER + yaml.safe_dump(full, sort_keys=False)
    if path.is_file():
        old = path.read_bytes()
        if old == text.encode():
            return
        if old.strip() and not old.startswith(SAVED_CONFIG_HEADER.encode()) and not _full_dump(old, full):
            keep = path.with_name(path.name + ".orig")
            n = 1
            while keep.exists():
                n += 1
                keep = path.with_name(f"{path.name}.orig{n}")
            path.rename(keep)
            print(f"note: {path} was not written by antimatter: kept as {keep}; {path} now holds the settings "
                  f"this run used", file=sys.stderr)
    tmp = path.with_name(path.name + ".tmp")  # a crash never leaves half a config
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
