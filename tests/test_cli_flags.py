"""The command line's shared flags have one definition (issue 37): every sub-command of `layerroute` that takes
`--model`, `--adapter`, `--config`, `--overlay`, `--set`, `--dtype`, `--output-dir`, ... takes it with the same
default, help, dest and choices (layerroute/config/flags.py); only whether it is required or repeatable may differ.
Parsers only: no model, milliseconds."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from layerroute.cli.main import COMMANDS, build_parser
from layerroute.config import flags
from layerroute.config.flags import SHARED_FLAGS

ROOT = Path(__file__).resolve().parents[1]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def definition(action: argparse.Action) -> tuple:
    """What must be the same wherever a shared flag appears (required and repeat are parameters)."""
    return action.dest, action.default, action.help, action.choices, action.type, action.metavar


def reference() -> dict[str, tuple]:
    """Each shared flag as flags.py defines it (optional, not repeated)."""
    parser = argparse.ArgumentParser()
    for add in (flags.add_config_arguments, flags.add_model_argument, flags.add_adapter_argument,
                flags.add_dtype_argument, flags.add_device_argument, flags.add_chat_template_argument,
                flags.add_threads_argument, flags.add_output_dir_argument, flags.add_output_argument,
                flags.add_json_argument, flags.add_draft_arguments):
        add(parser, **({"required": False} if "required" in add.__code__.co_varnames else {}))
    return {s: definition(a) for a in parser._actions for s in a.option_strings if s in SHARED_FLAGS}


def test_every_command_is_walked():
    assert set(subcommands()) == set(COMMANDS)
    assert set(reference()) == set(SHARED_FLAGS)


@pytest.mark.parametrize("flag", SHARED_FLAGS)
def test_a_shared_flag_has_one_definition_wherever_it_appears(flag):
    want = reference()[flag]
    seen = {}
    for name, parser in subcommands().items():
        for action in parser._actions:
            if flag in action.option_strings:
                seen[name] = definition(action)
    assert seen, f"no command takes {flag}"
    differ = {name: d for name, d in seen.items() if d != want}
    assert not differ, f"{flag} differs from layerroute/config/flags.py in: {differ}"


def test_the_commands_ask_for_the_shared_flags():
    """Each command that names a run config, loads a model or writes results takes the shared flags for it."""
    takes = {name: {s for a in p._actions for s in a.option_strings} for name, p in subcommands().items()}
    for name in ("config", "data", "train", "sweep", "eval", "oracle", "curve"):
        assert {"--config", "--overlay", "--set"} <= takes[name], name
    for name in ("generate", "serve", "bench", "agent"):
        assert {"--model", "--adapter", "--dtype", "--chat-template"} <= takes[name], name
    for name in ("train", "sweep", "eval", "ablation", "oracle", "curve"):
        assert "--output-dir" in takes[name], name
    for name in ("generate", "serve"):  # the commands that decode for a user draft the same way
        assert {"--prompt-lookup", "--draft"} <= takes[name], name


#: the flags benchmarks/ scripts take from flags.py too: a run config and what is loaded. Their `--threads` (default 1:
#: they measure on one thread) and `--output` (a JSON line, a PNG, a path prefix) stay their own.
BENCHMARK_FLAGS = ("--config", "--overlay", "--set", "--model", "--adapter", "--dtype", "--output-dir")


def test_only_flags_py_defines_them():
    """No module of the package writes `add_argument("--model", ...)` itself, nor a script of benchmarks/ for the
    run-config and model flags."""
    own = ROOT / "layerroute" / "config" / "flags.py"
    found = []
    for paths, names in (((ROOT / "layerroute").rglob("*.py"), SHARED_FLAGS),
                         ((ROOT / "benchmarks").glob("*.py"), BENCHMARK_FLAGS)):
        pattern = re.compile(r"""add_argument\(\s*["'](""" + "|".join(map(re.escape, names)) + r""")["']""")
        for path in sorted(paths):
            if path != own:
                found += [f"{path.relative_to(ROOT)}: {m.group(1)}" for m in pattern.finditer(path.read_text())]
    assert not found, "define these flags in layerroute/config/flags.py and ask for them there:\n" + "\n".join(found)


def test_the_parameters_are_the_only_difference():
    parser = argparse.ArgumentParser()
    flags.add_adapter_argument(parser, required=True, repeat=True)
    args = parser.parse_args(["--adapter", "a", "--adapter", "b"])
    assert args.adapter == ["a", "b"]
    (action,) = [a for a in parser._actions if "--adapter" in a.option_strings]
    assert action.required and definition(action) == reference()["--adapter"]
