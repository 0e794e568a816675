"""The typed config: defaults, YAML + dotted overrides, type coercion, round trips, and one clear message for
every mistake a user can make (each names the key and the fix)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from antimatter.config import (
    MODEL_PRESETS,
    ConfigError,
    RunConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    preset_model,
    save_config,
)
from antimatter.errors import UserError


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path=None, overrides=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    msg = str(e.value)
    assert "\n" not in msg, "config errors are one line"
    assert isinstance(e.value, UserError), "the CLI prints UserErrors without a traceback"
    return msg


# ------------------------------------------------------------------------------------------ loading


def test_defaults_load():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.recipe == "modern" and cfg.model.preset is None  # a new run gets the modern recipe
    assert (cfg.model.arch, cfg.model.activation_type, cfg.model.tie_embeddings, cfg.model.logit_softcap) == (
        "llama", "swiglu", False, 0.0)
    assert (cfg.train.optimizer, cfg.train.schedule) == ("muon", "wsd")
    assert load_config(None, ["recipe=gpt2"]) == RunConfig()  # the dataclasses' own defaults are gpt2's
    assert cfg.seq_len == cfg.model.block_size  # train.seq_len 0 = the model's context
    assert cfg.tokenizer_vocab_size == cfg.model.vocab_size  # tokenizer.vocab_size 0 = the model's vocab
    assert cfg.run_dir == Path("runs") / "default"
    assert [s.path for s in cfg.data.sources] == ["default"]


def test_yaml_file_then_dotted_overrides(tmp_path):
    path = write(tmp_path, "name: exp1\nmodel: seed-300m\ntrain:\n  lr: 1.0e-3\n  max_steps: 50\n"
                           "data:\n  dedup:\n    threshold: 0.7\n")
    cfg = load_config(path, ["train.lr=3e-4", "model.n_layer=12", "data.dedup.near=false"])
    assert cfg.name == "exp1"
    assert cfg.train.lr == pytest.approx(3e-4)  # override beats the file
    assert cfg.train.max_steps == 50  # the file beats the default
    assert cfg.data.dedup.threshold == pytest.approx(0.7) and cfg.data.dedup.near is False
    m = cfg.model
    assert (m.preset, m.n_layer, m.d_model, m.n_head, m.block_size) == ("seed-300m", 12, 1024, 16, 2048)


def test_preset_override_then_field_override():
    cfg = load_config(None, ["model=seed-300m", "model.n_layer=12"])
    assert cfg.model.preset == "seed-300m"
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.vocab_size) == (12, 1024, 50257)
    # a preset named inside the section works the same
    assert load_config(None, ["model.preset=seed-300m", "model.n_layer=12"]).model == cfg.model


def test_preset_override_on_a_saved_config_changes_the_shape(tmp_path):
    """A run's saved config.yaml spells out every model field; `model.preset=NAME` over it must give that
    preset's shape (it used to relabel the old shape with the new name), and a field after it still wins."""
    saved = tmp_path / "config.yaml"
    save_config(load_config(None, ["model=seed-300m"]), saved)
    cfg = load_config(saved, ["model.preset=tiny"])
    assert cfg.model == preset_model("tiny", "modern")
    cfg = load_config(saved, ["model.n_layer=3", "model.preset=tiny"])
    assert cfg.model.preset == "tiny" and cfg.model.n_layer == 3 and cfg.model.d_model == preset_model("tiny").d_model


def test_model_section_with_preset_key_in_yaml(tmp_path):
    path = write(tmp_path, "model:\n  preset: llama-tiny\n  n_layer: 3\n")
    m = load_config(path).model
    assert (m.arch, m.n_layer, m.n_kv_head, m.qk_norm, m.tie_embeddings) == ("llama", 3, 2, True, False)


def test_every_preset_loads_and_validates():
    for name in MODEL_PRESETS:
        cfg = load_config(None, [f"model={name}"])
        assert cfg.model == preset_model(name, "modern")
        assert load_config(None, [f"model={name}", "recipe=gpt2"]).model == preset_model(name)


def test_type_coercion():
    cfg = load_config(None, [
        "train.max_steps=1e3",  # YAML reads 1e3 as a string; an int field takes it when it is whole
        "train.warmup_steps=1_000",
        "train.micro_batch_size=4.0",
        "train.lr=3e-4",  # float from a string YAML does not read as a number
        "train.compile=yes",
        "train.tensorboard=off",
        "eval.plots=0",
        "eval.speed=True",
        "model.n_kv_head=null",
        "name=123",  # a string field takes a number as its text
        "eval.prompts=[Once upon a time, The end]",
    ])
    t = cfg.train
    assert t.max_steps == 1000 and isinstance(t.max_steps, int)
    assert t.warmup_steps == 1000 and isinstance(t.warmup_steps, int)
    assert t.micro_batch_size == 4 and isinstance(t.micro_batch_size, int)
    assert t.lr == pytest.approx(3e-4) and isinstance(t.lr, float)
    assert t.compile is True and t.tensorboard is False
    assert cfg.eval.plots is False and cfg.eval.speed is True
    assert cfg.model.n_kv_head is None
    assert cfg.name == "123"
    assert cfg.eval.prompts == ["Once upon a time", "The end"]


def test_yaml_types_coerced_from_file(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: '2e3'\n  compile: 'on'\n  lr: 1\n"
                           "data:\n  sources:\n    - path: a.txt\n    - {path: b.jsonl, format: jsonl}\n")
    cfg = load_config(path)
    assert cfg.train.max_steps == 2000 and cfg.train.compile is True
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert [(s.path, s.format) for s in cfg.data.sources] == [("a.txt", "auto"), ("b.jsonl", "jsonl")]


def test_save_and_load_round_trip(tmp_path):
    cfg = load_config(None, ["model=llama-tiny", "model.n_layer=3", "train.lr=1e-3", "data.sources=[{path: x}]",
                             "eval.sample.top_k=7", "tokenizer.vocab_size=300"])
    save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert load_config(tmp_path / "sub" / "config.yaml") == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing here\n")) == load_config()


# ------------------------------------------------------------------------------------------- errors


def test_unknown_key_suggests_the_right_one():
    assert error_of(None, ["train.lrr=1e-3"]) == "unknown config key 'train.lrr': did you mean 'train.lr'?"
    assert error_of(None, ["model.n_layr=3"]) == "unknown config key 'model.n_layr': did you mean 'model.n_layer'?"
    assert error_of(None, ["trian.lr=1"]) == "unknown config key 'trian': did you mean 'train'?"
    msg = error_of(None, ["data.dedup.treshold=0.5"])
    assert msg == "unknown config key 'data.dedup.treshold': did you mean 'data.dedup.threshold'?"
    msg = error_of(None, ["data.sources=[{pth: a.txt}]"])
    assert msg == "unknown config key 'data.sources[0].pth': did you mean 'data.sources[0].path'?"


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    msg = error_of(write(tmp_path, "train:\n  zzzzqqq: 1\n"))
    assert msg.startswith("unknown config key 'train.zzzzqqq': valid keys: ")
    assert "lr" in msg and "max_steps" in msg


@pytest.mark.parametrize("name", ["a\nb", "tab\there", "nul\x00"])
def test_a_run_name_with_control_characters_is_refused(name):
    """A newline in --name made a folder with a newline in its name."""
    with pytest.raises(ConfigError, match="must be one plain folder name .*control characters"):
        load_config({"name": name})


def test_a_key_that_is_a_number_is_named_not_a_traceback(tmp_path):
    """YAML reads `1: 2` as an integer key: the close-match search over names raised a TypeError."""
    assert error_of(write(tmp_path, "name: r\n1: 2\n")).startswith("unknown config key '1': valid keys: recipe")
    assert error_of(write(tmp_path, "train:\n  7: 1\n")).startswith("unknown config key 'train.7': valid keys")


@pytest.mark.parametrize("override, expected", [
    ("train.micro_batch_size=abc", "train.micro_batch_size: expected an integer, got 'abc'"),
    ("train.max_steps=1.5", "train.max_steps: expected an integer, got 1.5"),
    ("train.max_steps=true", "train.max_steps: expected an integer, got True"),
    ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
    ("train.compile=maybe", "train.compile: expected true or false, got 'maybe'"),
    ("model.n_kv_head=two", "model.n_kv_head: expected an integer, got 'two'"),
    ("name=[a, b]", "name: expected a string, got ['a', 'b']"),
    ("data.sources=5", "data.sources: expected a list, got 5"),
    ("train=5", "override 'train=5': train is a section, not a value: set one of its keys (e.g. train.device=...)"),
    ("data.filters=1", "override 'data.filters=1': data.filters is a section, not a value: set one of its keys "
                       "(e.g. data.filters.enabled=...)"),
    ("data..seed=3", "override 'data..seed=3': the key has an empty part between dots: write it like train.lr=3e-4"),
])
def test_wrong_type_names_key_and_value(override, expected):
    assert error_of(None, [override]) == expected


@pytest.mark.parametrize("model", ["5", "[quickstart]"])
def test_a_model_section_that_is_neither_a_name_nor_a_mapping(tmp_path, model):
    (tmp_path / "c.yaml").write_text(f"name: h\nmodel: {model}\n")
    assert error_of(tmp_path / "c.yaml").startswith("model: expected a preset name or a mapping of ModelConfig")


def test_a_section_set_to_a_value_is_the_override_blamed():
    """`data=3` then a CLI option's `data.workers=1`: the error names `data=3`, not the option's override."""
    assert error_of(None, ["data=3", "data.workers=1"]).startswith("override 'data=3': data is a section")


def test_d_model_not_divisible_by_n_head_names_a_fix():
    msg = error_of(None, ["model=tiny", "model.n_head=5"])
    assert msg == ("model.d_model (32) must be divisible by model.n_head (5): change one of them "
                   "(e.g. n_head=4)")
    assert "n_head=" in error_of(None, ["model.d_model=100", "model.n_head=3"])


def test_gqa_heads_must_divide():
    assert error_of(None, ["model=llama-tiny", "model.n_kv_head=3"]) == \
        "model.n_head (4) must be divisible by model.n_kv_head (3)"


def test_seq_len_longer_than_block_size():
    msg = error_of(None, ["model=tiny", "train.seq_len=128"])
    assert msg == ("train.seq_len (128) is longer than the model's context model.block_size (64): "
                   "lower train.seq_len or raise model.block_size")


def test_unknown_preset_lists_presets():
    msg = error_of(None, ["model=seed-300"])
    assert msg.startswith("unknown model preset 'seed-300': did you mean 'seed-300m'? choose one of ")
    for name in MODEL_PRESETS:
        assert name in msg
    msg = error_of(None, ["model=qqqq"])
    assert msg == f"unknown model preset 'qqqq': choose one of {', '.join(MODEL_PRESETS)}"
    with pytest.raises(ConfigError, match="unknown model preset 'nope'"):
        preset_model("nope")


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert error_of(missing) == f"config file not found: {missing} (check the path given to --config)"


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1e-3\n  max_steps: [1, 2\n")
    msg = error_of(path)
    assert msg.startswith(f"config file {path} is not valid YAML at line ")
    assert msg.endswith(": fix the syntax")


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = write(tmp_path, "- a\n- b\n")
    assert error_of(path) == f"config file {path} must hold a mapping of sections (model:, train:, ...)"


def test_override_without_equals():
    assert error_of(None, ["train.lr"]) == "override 'train.lr' must look like section.key=value (e.g. train.lr=3e-4)"
    assert error_of(None, ["=3"]) == "override '=3' has an empty key"
    assert error_of(None, ["train.lr=1e-3", "train.lr.x=1"]) == "override 'train.lr.x=1': 'lr' is not a section"


@pytest.mark.parametrize("override, fragment", [
    ("model.arch=mamba", "model.arch must be gpt2 or llama, got 'mamba'"),
    ("model.n_layer=0", "model.n_layer must be positive"),
    ("model.dropout=1.0", "model.dropout must be in [0, 1)"),
    ("train.dtype=fp64", "train.dtype must be auto, bf16, fp16 or fp32"),
    ("train.parallel=tp", "train.parallel must be ddp or fsdp"),
    ("train.schedule=step", "train.schedule must be cosine, linear, constant or wsd"),
    ("train.attention=fa3", "train.attention must be auto, flash, cudnn, efficient or math, got 'fa3'"),
    ("train.lr=0", "train.lr must be positive"),
    ("tokenizer.vocab_size=60000", "tokenizer.vocab_size (60000) exceeds model.vocab_size (50257): lower "
                                   "tokenizer.vocab_size, or raise model.vocab_size with it"),
    ("tokenizer.vocab_size=200", "tokenizer vocab size 200 is too small"),
    ("data.val_fraction=0", "data.val_fraction must be in (0, 1), got 0.0"),
])
def test_other_validation_errors(override, fragment):
    assert fragment in error_of(None, [override])


def test_odd_head_dim_for_rope():
    assert "RoPE needs an even head dimension" in error_of(None, ["model=llama-tiny", "model.d_model=36"])


@pytest.mark.parametrize("override", ["model.n_kv_head=-1", "model.d_ff=-8", "train.seq_len=-5"])
def test_negative_sizes_are_refused(override):
    error_of(None, ["model=tiny", override])


def test_field_override_survives_a_later_preset_override():
    assert load_config(None, ["model.n_layer=12", "model=seed-300m"]).model.n_layer == 12


def test_one_prompt_with_commas_stays_one_prompt():
    cfg = load_config(None, ["eval.prompts=Once upon a time, there"])
    assert cfg.eval.prompts == ["Once upon a time, there"]
    assert load_config(None, ["eval.prompts=[a, b]"]).eval.prompts == ["a", "b"]


# ------------------------------------------------------------------------------- choices and sections


def _literal_keys(cls: type = RunConfig, prefix: str = ""):
    """(dotted key, choices) of every setting annotated with a Literal, nested sections (and the first item
    of a list of them) included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            yield from _literal_keys(typing.get_args(tp)[0], f"{key}[0].")
        elif dataclasses.is_dataclass(tp):
            yield from _literal_keys(tp, f"{key}.")
        elif typing.get_origin(tp) is typing.Literal:
            yield key, typing.get_args(tp)


def test_every_choice_setting_refuses_another_value_naming_key_value_and_choices():
    keys = dict(_literal_keys())
    for key in ("model.arch", "model.norm", "train.dtype", "train.optimizer", "train.schedule", "eval.dtype",
                "export.dtype", "data.sources[0].format", "data.sources[0].rules"):
        assert key in keys, key
    for key, choices in keys.items():
        if key.startswith("data.sources[0]."):
            override = f"data.sources=[{{{key.rsplit('.', 1)[1]}: bogus}}]"
        else:
            override = f"{key}=bogus"
        allowed = ", ".join(choices[:-1]) + f" or {choices[-1]}"
        assert error_of(None, [override]) == f"{key} must be {allowed}, got 'bogus'"
        for choice in choices:  # each listed choice loads
            if not key.startswith("data.sources"):
                load_config(None, [f"{key}={choice}"])


def test_the_generate_section_keeps_the_old_behaviour_by_default():
    """Generation borrowed train.device before it had a section: null still means that, and the sampling
    settings keep their old defaults and keys, but for the seed: null, a new one drawn for each sample (eval's
    samples keep 42). threads 0 = automatic."""
    from antimatter.config import GenerateConfig, SampleConfig

    g = load_config().generate
    assert isinstance(g, GenerateConfig) and isinstance(g, SampleConfig)
    assert (g.checkpoint, g.device, g.compile, g.int8, g.threads, g.seed) == ("best", None, False, False, 0, None)
    assert SampleConfig(**{k: getattr(g, k) for k in SampleConfig.__dataclass_fields__} | {"seed": 42}) == SampleConfig()
    assert load_config().eval.sample.seed == 42
    assert error_of(None, ["generate.threads=-1"]) == "generate.threads must be >= 0 (0 = auto), got -1"
    assert load_config(None, ["generate.seed=7"]).generate.seed == 7
    assert load_config().export.dtype == "fp32" and load_config().export.checkpoint == "best"
    cfg = load_config(None, ["generate.device=cuda:1", "generate.top_k=7", "generate.compile=true",
                             "export.dtype=bf16"])
    assert (cfg.generate.device, cfg.generate.top_k, cfg.generate.compile, cfg.export.dtype) == (
        "cuda:1", 7, True, "bf16")
    assert error_of(None, ["generate.device=banana"]).startswith("generate.device 'banana' is not a device")
    assert error_of(None, ["generate.temperature=-1"]) == "generate.temperature must be >= 0 (0 = greedy), got -1.0"


def test_a_config_saved_before_the_generate_section_grew_still_loads(tmp_path):
    path = write(tmp_path, "generate:\n  top_k: 5\n  seed: 3\n")
    g = load_config(path).generate
    assert (g.top_k, g.seed, g.device) == (5, 3, None)
    save_config(load_config(path, ["generate.device=cpu"]), tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml").generate.device == "cpu"


def test_typed_overrides_are_set_as_given_and_a_preset_still_comes_first():
    """The CLI's options arrive as (key, value) pairs: no YAML reading of the value (a path with ': ' stays
    one string), and `model` among them is applied before the dotted model fields, as `model=NAME` is."""
    cfg = load_config(None, ["model.n_layer=3", ("model", "tiny"), ("train.resume", "a: b/[c]")])
    assert cfg.model.preset == "tiny" and cfg.model.n_layer == 3 and cfg.model.d_model == 32
    assert cfg.train.resume == "a: b/[c]"


def test_a_dict_of_sections_loads_as_a_yaml_file_does():
    """From Python a config may be a dict of the YAML file's sections; overrides go on top of it and the
    caller's dict stays as it was."""
    data = {"model": "tiny", "train": {"lr": 1e-3}}
    cfg = load_config(data, ["train.lr=2e-3", "train.max_steps=5"])
    assert (cfg.model.preset, cfg.train.lr, cfg.train.max_steps) == ("tiny", 2e-3, 5)
    assert data == {"model": "tiny", "train": {"lr": 1e-3}}
    assert error_of({"train": {"lrr": 1}}, []) == "unknown config key 'train.lrr': did you mean 'train.lr'?"
