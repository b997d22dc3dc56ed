"""Command-line options made from configuration dataclasses (dsv4.options): every exposed field
is an option whose --help quotes the field's true default, and parsing gives the dataclass
back. Plus the one error base, dsv4.Error, that `main` reports in one line."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import pytest

import dsv4
from dsv4.cli import build_parser, main
from dsv4.options import dataclass_from_args, option_string
from dsv4.posttrain import cli as posttrain_cli
from dsv4.posttrain.distill import DistillConfig
from dsv4.posttrain.grpo import GRPOConfig
from dsv4.posttrain.pipeline import PosttrainConfig
from dsv4.posttrain.sft import SFTConfig
from dsv4.pretrain import cli as pretrain_cli
from dsv4.pretrain.train import TrainConfig
from dsv4.weights import cli as weights_cli

# (command, config with the defaults it shows, exposed fields, renamed options)
EXPOSED = [
    ("train", TrainConfig(), pretrain_cli.MODEL_FIELDS + pretrain_cli.TRAIN_FIELDS,
     pretrain_cli.RENAME),
    ("sft", SFTConfig(), posttrain_cli.SFT_FIELDS, posttrain_cli.SFT_RENAME),
    ("grpo", GRPOConfig(), posttrain_cli.GRPO_FIELDS, {}),
    ("distill", DistillConfig(), posttrain_cli.DISTILL_FIELDS, {}),
    ("posttrain", PosttrainConfig(), posttrain_cli.POSTTRAIN_FIELDS,
     posttrain_cli.POSTTRAIN_RENAME),
    *[("posttrain", getattr(PosttrainConfig(), stage), tuple(rename), rename)
      for stage, (rename, _) in posttrain_cli.STAGE_OPTIONS.items()],
]


def help_text(capsys: pytest.CaptureFixture[str], command: str) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command, config, names, rename", EXPOSED)
def test_every_field_is_an_option_with_its_true_default(capsys, command, config, names,
                                                        rename) -> None:
    text = help_text(capsys, command)
    options = text[text.index("options:"):]
    for name in names:
        field = next(f for f in dataclasses.fields(config) if f.name == name)
        value = getattr(config, name)
        flag = option_string(field, value, rename)
        assert f" {flag} " in options, flag
        if isinstance(value, bool):
            continue  # a flag: giving it flips the default
        shown = field.metadata["default_text"] or str(value)
        entry = options[options.index(f" {flag} "):]
        next_default = entry[entry.index("(default: "):]
        assert next_default.startswith(f"(default: {shown})"), (flag, next_default[:60])


def changed(config: Any, name: str) -> Any:
    """Another valid value for one field, as the command line would give it."""
    field = next(f for f in dataclasses.fields(config) if f.name == name)
    value = getattr(config, name)
    if isinstance(value, bool):
        return not value
    if field.metadata.get("choices"):
        return next(c for c in field.metadata["choices"] if c != value)
    if isinstance(value, float):
        return value / 2
    if isinstance(value, int) or name in ("micro_batch", "threads", "warmup_steps"):
        return (value or 0) + 3
    if name == "data" or name == "domains":
        return ["a", "b c"]
    return "elsewhere"


def argv_for(config: Any, values: dict[str, Any], rename: dict[str, str]) -> list[str]:
    argv = []
    for field in dataclasses.fields(config):
        if field.name not in values:
            continue
        flag = option_string(field, getattr(config, field.name), rename)
        value = values[field.name]
        if isinstance(value, bool):
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *value]
        else:
            argv += [flag, str(value)]
    return argv


@pytest.mark.parametrize("command, config, names, rename", EXPOSED[:5])
def test_parsing_gives_the_dataclass_back(command, config, names, rename) -> None:
    names = [name for name in names if name != "preset"]  # --preset excludes --config
    values = {name: changed(config, name) for name in names}
    argv = [command, *argv_for(config, values, rename), *required(command)]
    args = build_parser().parse_args(argv)
    assert dataclass_from_args(config, args, names, rename=rename) == dataclasses.replace(
        config, **values)
    untouched = build_parser().parse_args([command, *required(command)])
    assert dataclass_from_args(config, untouched, names, rename=rename) == config


def required(command: str) -> list[str]:
    return {"sft": ["--from", "r", "--out", "o"], "grpo": ["--from", "r", "--out", "o",
                                                          "--domain", "sum"],
            "distill": ["--student", "r", "--out", "o", "--teacher", "sum=t"]}.get(command, [])


def test_train_config_from_the_command_line() -> None:
    parse = build_parser().parse_args
    assert pretrain_cli.train_config(parse(["train"])) == TrainConfig()
    tc = pretrain_cli.train_config(parse(["train", "--config", "c.json", "--fp32",
                                          "--no-progress"]))
    assert (tc.preset, tc.config_path, tc.out) == (None, "c.json", "runs/custom")
    assert (tc.autocast, tc.progress) == ("fp32", False)
    assert pretrain_cli.train_config(parse(["train", "--preset", "small"])).out == "runs/small"
    assert pretrain_cli.train_config(parse(["train", "--resume"])).steps is None  # the run's
    assert pretrain_cli.train_config(parse(["train", "--resume", "--steps", "9"])).steps == 9


def test_posttrain_options_set_the_nested_stage_configs() -> None:
    args = build_parser().parse_args(["posttrain", "--batch-size", "8", "--grpo-steps", "5",
                                      "--from", "run", "--threads", "2"])
    cfg = posttrain_cli.posttrain_config(args)
    default = PosttrainConfig()
    assert (cfg.from_run, cfg.threads, cfg.grpo.steps) == ("run", 2, 5)
    assert cfg.base_sft.batch_size == cfg.specialist_sft.batch_size == 8
    assert cfg.base_sft.steps == default.base_sft.steps == 200  # the nested default, kept
    assert cfg.specialist_sft.lr == default.specialist_sft.lr
    empty = posttrain_cli.posttrain_config(build_parser().parse_args(["posttrain"]))
    assert empty == default


def test_bad_option_values_are_refused_by_argparse(capsys) -> None:
    for argv in (["train", "--steps", "0"], ["grpo", "--temperature", "0"],
                 ["train", "--optimizer", "sgd"]):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(argv)
        assert exit_info.value.code == 2
    capsys.readouterr()


def test_every_user_error_is_a_dsv4_error() -> None:
    from dsv4.commands import CommandError
    from dsv4.evaluate.backends import EvalError
    from dsv4.evaluate.store import StoreError
    from dsv4.inference.cache import CacheError
    from dsv4.model.config import ConfigError
    from dsv4.posttrain.common import PosttrainError
    from dsv4.pretrain.data import DataError
    from dsv4.pretrain.train import TrainingDiverged, TrainingError
    from dsv4.text.tokenizer import TokenizerError
    from dsv4.weights.checkpoint import CheckpointError

    for error in (ConfigError, EvalError, StoreError, CacheError, PosttrainError, DataError,
                  TokenizerError, CheckpointError):
        assert issubclass(error, dsv4.Error) and issubclass(error, ValueError), error
    assert issubclass(TrainingDiverged, TrainingError) and issubclass(TrainingError, RuntimeError)
    assert issubclass(TrainingError, dsv4.Error) and issubclass(CommandError, dsv4.Error)


def test_main_reports_a_dsv4_error_in_one_line(capsys, monkeypatch) -> None:
    def fail(args: argparse.Namespace) -> int:
        raise dsv4.Error("the value is wrong; use another")

    monkeypatch.setattr(weights_cli, "cmd_info", fail)
    assert main(["info", "--preset", "nano"]) == 2
    assert capsys.readouterr().err == "dsv4 info: error: the value is wrong; use another\n"
