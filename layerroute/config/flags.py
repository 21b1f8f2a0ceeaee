"""The command line's shared flags, each defined once: one default and one help for every command that takes it.

`--config`, `--overlay`, `--set` (a run config and how it is changed), `--model`, `--adapter`, `--dtype`, `--device`,
`--chat-template`, `--threads` (what is loaded, and how), `--output-dir`, `--output` (where results go), `--json`,
and `--prompt-lookup`, `--draft` (lossless drafting: generate and serve).
Every command of `layerroute` (the dispatcher: layerroute/cli/main.py), the demo and the scripts of benchmarks/ ask
these functions for them; `tests/test_cli_flags.py` walks every sub-command's parser and checks that each flag has one
default and one help wherever it appears, and that no module defines one of them by hand.

Where commands legitimately differ, the difference is a parameter, never a second definition: `--adapter` is required
by `curve`, optional elsewhere and repeatable in `eval`; `--model` is repeatable in benchmarks/dtype_compare.py; `--config` is required by `train` and optional where an
adapter's own config is the default. Pass an argument group (`parser.add_argument_group(...)`, a mutually exclusive
group) as `parser` to place a flag in it.

They live in `config`, not in `cli/`, because the commands' own modules sit in config, data, train, eval and serve,
and `cli` is the top part that nothing may import (docs/architecture.md); `config` is the lowest part every command
may import. `raw_config` is the one way a command turns `--config` / `--overlay` / `--set` into a raw config.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .run import resolve_raw
from .sections import DTYPES, ModelConfig

OFFLINE_MODEL = ModelConfig().name  # what `--model` falls back to when no adapter names a base

HELP = {
    "--config": "YAML run config (see configs/); a command given an --adapter defaults to the config that adapter was "
                "trained with",
    "--overlay": "YAML with some of the config's sections whose keys replace the config's, key by key (e.g. a recipe "
                 "of experiments/, or configs/eval-of-record.overlay.yaml); repeatable, applied in order before "
                 "--set; `eval` takes an eval: section only (what is evaluated, never what was trained)",
    "--set": "override one setting, e.g. --set train.lr=1e-3 or data.sources[0].limit=100 (repeatable, after "
             "--overlay; the value is parsed as YAML)",
    "--model": "base model: hub id, local folder, .gguf file, packaged name or shape:<preset> (default: the "
               f"adapter's base, else the run config's model.name, else the packaged offline {OFFLINE_MODEL}); "
               "repeatable where a script compares several",
    "--adapter": "adapter directory (routers + LoRA, as `layerroute train` writes it); repeatable where a command "
                 "compares several (eval: one per seed)",
    "--dtype": "frozen weights' dtype; auto (default): bfloat16 where the device runs bf16 matmuls natively (CUDA "
               "with bf16, a CPU with AVX-512 BF16 or AMX), else float32 (emulated bf16 is ~40x slower)",
    "--device": "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:N'",
    "--chat-template": "chat template for a base model without one (chatml, a Jinja file or inline Jinja; an "
                       "adapter brings its own)",
    "--threads": "torch CPU threads (default: torch's choice)",
    "--output-dir": "folder to write into (created if missing; `train` defaults to the config's train.output_dir)",
    "--output": "also write the whole result here, as JSON (atomically: never half a file)",
    "--json": "print the whole result as JSON instead of tables",
    "--prompt-lookup": "draft up to K tokens per forward from the prompt's n-grams, verified by the model: the same "
                       "output, fewer forwards where the answer copies the prompt (greedy, not under a grammar: "
                       "--draft lookup drafts there too; 0 = off)",
    "--draft": "lossless drafts verified in one forward with greedy acceptance, comma-separated from "
               "grammar,lookup,suffix (grammar: the forced text of the step's grammar, under its budget rule): the "
               "same tokens as plain (constrained) greedy decoding, fewer forwards (layerroute.infer.verify); "
               "generate: one --prompt; serve: a request decoded alone, acceptance per drafter in its layerroute "
               "field and /metrics; agent: the --spawn server's, acceptance per step",
}


def add_config_arguments(parser, required: bool = True, default: str | None = None) -> None:
    """--config YAML, --overlay YAML (repeatable), --set KEY=VALUE (repeatable; `args.overrides`). `required`:
    False where the command has another source (an adapter's own config, `config --describe`)."""
    parser.add_argument("--config", required=required, default=default, metavar="YAML", help=HELP["--config"])
    parser.add_argument("--overlay", action="append", default=[], metavar="YAML", help=HELP["--overlay"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=HELP["--set"])


def raw_config(args, default: dict | None = None, eval_only: bool = False) -> dict:
    """The raw run config of `--config` (else `default`, e.g. an adapter's training config) with `--overlay` and
    `--set` applied, every key where it is now (`config.run.resolve_raw`); validate it with `RunConfig.from_dict`."""
    base = args.config if args.config else default
    if base is None:
        raise ConfigError("--config YAML is needed (no adapter gives a config here)")
    return resolve_raw(base, args.overrides, args.overlay, eval_only=eval_only)


def add_model_argument(parser, repeat: bool = False) -> None:
    """--model NAME (default None: the adapter's base, else the config's, else `OFFLINE_MODEL`); `repeat`: a list."""
    parser.add_argument("--model", default=None, action="append" if repeat else "store", metavar="NAME",
                        help=HELP["--model"])


def add_adapter_argument(parser, required: bool = False, repeat: bool = False) -> None:
    """--adapter DIR; `repeat`: a list, one per --adapter (eval's seeds)."""
    parser.add_argument("--adapter", required=required, default=None, action="append" if repeat else "store",
                        metavar="DIR", help=HELP["--adapter"])


def add_dtype_argument(parser) -> None:
    """--dtype: the choices of model.dtype, default auto."""
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help=HELP["--dtype"])


def add_device_argument(parser) -> None:
    parser.add_argument("--device", default="auto", help=HELP["--device"])


def add_chat_template_argument(parser) -> None:
    """--chat-template: model.chat_template for the commands without --set (generate, serve, bench, agent)."""
    parser.add_argument("--chat-template", default=None, metavar="PRESET|FILE", help=HELP["--chat-template"])


def add_threads_argument(parser) -> None:
    parser.add_argument("--threads", type=int, default=None, help=HELP["--threads"])


def add_output_dir_argument(parser, required: bool = True, default: str | Path | None = None) -> None:
    parser.add_argument("--output-dir", required=required, default=default, metavar="DIR", help=HELP["--output-dir"])


def add_output_argument(parser, required: bool = False) -> None:
    parser.add_argument("--output", required=required, default=None, metavar="FILE", help=HELP["--output"])


def add_json_argument(parser) -> None:
    parser.add_argument("--json", action="store_true", help=HELP["--json"])


def add_draft_arguments(parser) -> None:
    """--prompt-lookup K (default 0: off) and --draft SOURCES (default None: no drafts): generate and serve. The
    drafter names are checked where they are made (`infer.drafts.make_drafters`: serve at start, generate before its
    one prompt)."""
    parser.add_argument("--prompt-lookup", type=int, default=0, metavar="K", help=HELP["--prompt-lookup"])
    parser.add_argument("--draft", default=None, metavar="SOURCES", help=HELP["--draft"])


#: the flags this module defines (what tests/test_cli_flags.py checks)
SHARED_FLAGS = tuple(HELP)
