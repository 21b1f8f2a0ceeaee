"""No shipped config, config default or CLI default names a file outside the repository (issue 38).

A fresh clone in a folder of its own has nothing beside it: a path with a `..` component or an absolute path in
configs/*.yaml, experiments/*.yaml, the config dataclasses' defaults or a `layerroute <command>` flag's default
works only on the machine it was written on (the GSM8K configs once read ../shared/data/gsm8k). Hub ids
("openai/gsm8k") are not paths and pass: only `..` components and absolute paths are refused.
"""

from __future__ import annotations

import argparse
from pathlib import PurePosixPath, PureWindowsPath

import pytest
import yaml

from tests.helpers import ROOT

SHIPPED = sorted([*(ROOT / "configs").glob("*.yaml"), *(ROOT / "experiments").glob("*.yaml")])


def outside(value: str) -> bool:
    """Whether a string, read as a path, leaves the repository: absolute, home-relative or with a `..` part."""
    text = value.strip()
    if not text or "\n" in text:
        return False  # empty, or inline text (a Jinja template), not a path
    if text.startswith(("/", "~")) or PureWindowsPath(text).drive:
        return True
    return ".." in PurePosixPath(text.replace("\\", "/")).parts


def strings(node, where: str):
    """(key path, string) for every string in a nested YAML / dict / list value."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from strings(v, f"{where}.{k}")
    elif isinstance(node, list | tuple):
        for i, v in enumerate(node):
            yield from strings(v, f"{where}[{i}]")
    elif isinstance(node, str):
        yield where, node


def test_the_check_catches_what_it_should():
    bad = ["../shared/data/gsm8k/train.jsonl", "/work/shared/data/gsm8k/test.jsonl", "~/data.jsonl",
           "data/../../x.jsonl", "C:\\data\\x.jsonl"]
    good = ["configs/offline-smollm2.yaml", "openai/gsm8k", "tests/fixtures/tokenizers/smollm2", "runs/demo",
            "smollm2-135m-instruct", "shape:tiny-qwen2", "{{ bos_token }}\n{% for m in messages %}"]
    assert [p for p in bad if not outside(p)] == [] and [p for p in good if outside(p)] == []


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_shipped_config_points_outside_the_repository(path):
    found = [(k, v) for k, v in strings(yaml.safe_load(path.read_text()), path.stem) if outside(v)]
    assert not found, f"{path.relative_to(ROOT)} names paths outside the repository: {found}"


def test_no_config_default_points_outside_the_repository():
    from layerroute.config import RunConfig
    from layerroute.data.config import SourceConfig

    defaults = RunConfig().to_dict()
    defaults["source"] = {k: v for k, v in vars(SourceConfig("bfcl")).items()}
    found = [(k, v) for k, v in strings(defaults, "defaults") if outside(v)]
    assert not found, found


def test_no_cli_default_points_outside_the_repository():
    from layerroute.cli.demo import DEMO_OVERRIDES
    from layerroute.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    found = []
    for name, parser in sub.choices.items():
        for action in parser._actions:
            found += [(f"{name} {action.dest}", v) for _, v in strings(action.default, "") if outside(v)]
    found += [("demo --set", v) for v in DEMO_OVERRIDES if outside(v.split("=", 1)[-1])]
    assert len(sub.choices) >= 10 and not found, found
