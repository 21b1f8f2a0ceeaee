"""`layerroute config --config YAML [--overlay YAML ...] [--set key=value ...] [--describe]`.

Validates a run config exactly as `layerroute train` reads it (overlays, then `--set`), without loading a model or
any data, and prints the resolved settings as YAML: every section with every setting, defaults filled in, so a
30-minute run can be checked before it starts. `--describe` prints, instead, every setting with its default and
its one-line help (the data section's help is each field's docstring in layerroute/data/config.py): the method's
own settings section by section, then, under their own heading, the options of the recipes the ablation rejected
(`train.experimental.*`, `router.experimental.*`: layerroute/config/experimental.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import yaml

from .experimental import GROUP, GROUP_HELP
from .fields import describe, groups
from .flags import add_config_arguments, raw_config
from .run import RUN_SECTIONS, RunConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, required=False)  # needed unless --describe
    parser.add_argument("--describe", action="store_true",
                        help="print every setting with its default and one-line help instead")


def _plain(value):
    """Tuples (a Literal's choices, dataclasses.asdict's output) as lists, so the YAML stays plain."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def resolved_yaml(cfg: RunConfig) -> str:
    """The run config as YAML, sections in file order, settings in declaration order."""
    return yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False, allow_unicode=True, width=120)


def describe_lines() -> list[str]:
    """`section.key: default  # help`, one line per setting of every section: the method's settings first, then the
    experimental groups (the rejected recipes' options) apart, under one heading."""
    defaults = RunConfig()
    lines, apart = [], []
    for section in RUN_SECTIONS:
        cls = type(getattr(defaults, section))
        lines.append(f"# {section}: {(cls.__doc__ or '').strip().splitlines()[0]}")
        lines += _rows(describe(cls, section) if section != "data" else _data_rows(cls))
        lines.append("")
        for name, group_cls, _ in groups(cls) if section != "data" else []:
            apart += _rows(describe(group_cls, f"{section}.{name}"))
    if apart:
        lines += [f"# {GROUP} (train.{GROUP}.*, router.{GROUP}.*): {GROUP_HELP}", *apart, ""]
    return lines


def _rows(rows: list[tuple[str, object, str]]) -> list[str]:
    out = []
    for key, default, help_text in rows:
        shown = yaml.safe_dump(_plain(default), default_flow_style=True, width=10_000).strip()
        shown = shown.removesuffix("\n...").removesuffix("...").strip()
        out.append(f"{key}: {shown}" + (f"  # {help_text}" if help_text else ""))
    return out


def _data_rows(cls) -> list[tuple[str, object, str]]:
    """The data section's settings: its fields' help is the docstring under each (layerroute/data/config.py)."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append((f"data.{f.name}", default, docs.get(f.name, "")))
    return rows


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    if args.describe:
        print("\n".join(describe_lines()).rstrip())
        return 0
    if not args.config:
        raise ConfigError("layerroute config needs --config YAML (or --describe)")
    cfg = RunConfig.from_dict(raw_config(args))
    print(f"# {args.config}" + "".join(f" + {o}" for o in args.overlay)
          + "".join(f" --set {s}" for s in args.overrides) + ": valid (no model loaded)")
    print(resolved_yaml(cfg), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    from ..errors import LayerRouteError

    parser = argparse.ArgumentParser(prog="layerroute config", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except LayerRouteError as err:
        print(f"layerroute config: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
