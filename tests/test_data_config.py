"""DataConfig validation names the key; the `layerroute data` CLI on fixture data."""

import json
import os
import re

import pytest
import yaml

from layerroute.data import cli
from layerroute.data.config import DataConfig, SourceConfig
from layerroute.errors import ConfigError

HERE = os.path.dirname(__file__)
FIX = os.path.join(HERE, "fixtures", "data")
TOK = os.path.join(HERE, "fixtures", "tokenizers", "smollm2")


@pytest.mark.parametrize(
    "d, key",
    [
        ({"eval_fraction": 1.5}, "data.eval_fraction"),
        ({"max_length": 0}, "data.max_length"),
        ({"bad_row_max_fraction": -0.1}, "data.bad_row_max_fraction"),
        ({"bfcl_eval_only_categories": ["live_foo"]}, "data.bfcl_eval_only_categories"),
        ({"length_match_bin_ratio": 1.0}, "data.length_match_bin_ratio"),
        (
            {"sources": [{"name": "bfcl"}, {"name": "gsm8k_jsonl", "path": "x", "limit": 0}]},
            "data.sources[1].limit",
        ),
        ({"sources": [{"name": "nope"}]}, "data.sources[0].name"),
        ({"sources": [{"name": "jsonl"}]}, "data.sources[0].path"),
        ({"sources": [{"name": "gsm_symbolic"}]}, "data.sources[0].limit"),
        ({"sources": [{"name": "gsm8k_jsonl", "split": "validation"}]}, "data.sources[0].split"),
        # the packaged GSM8K test split is evaluation data: training on it is refused
        ({"sources": [{"name": "gsm8k_jsonl", "split": "test"}]}, "data.sources[0].role"),
        ({"sources": [{"name": "gsm8k_jsonl", "split": "test", "role": "train"}]}, "data.sources[0].role"),
        ({"sources": [{"name": "bfcl", "categories": ["irrelevance"]}]}, "data.sources[0].categories"),
        ({"sources": [{"name": "bfcl", "role": "test"}]}, "data.sources[0].role"),
        (
            {"sources": [{"name": "bfcl", "turns_per_conversation": 2}]},
            "data.sources[0].turns_per_conversation",
        ),
        ({"sources": [{"name": "glaive", "categories": ["simple_python"]}]}, "data.sources[0].categories"),
    ],
)
def test_errors_name_the_key(d, key):
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ":"):
        DataConfig.from_dict(d)


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match=r"data: unknown key\(s\) 'max_len'"):
        DataConfig.from_dict({"max_len": 5})
    with pytest.raises(ConfigError, match=r"data.sources\[0\]: unknown key\(s\) 'lmit'"):
        DataConfig.from_dict({"sources": [{"name": "bfcl", "lmit": 3}]})


def test_defaults():
    cfg = DataConfig.from_dict({"sources": [{"name": "bfcl"}]})
    assert cfg.bad_row_max_fraction == 0.05 and cfg.bfcl_eval_only_categories[0] == "live_simple"
    assert cfg.sources[0] == SourceConfig("bfcl")
    assert SourceConfig("glaive").resolved_path == "glaiveai/glaive-function-calling-v2"
    assert SourceConfig("gsm8k_hub").resolved_hub_config == "main"


def test_apply_override():
    from layerroute.config import apply_override  # the data CLI's --set parser is the run config's

    d = {"data": {"sources": [{"name": "bfcl"}]}, "model": {"name": "m"}}
    apply_override(d, "data.max_length=512")
    apply_override(d, "data.sources[0].limit=3")
    apply_override(d, "data.sources.0.categories=[parallel, live_simple]")
    apply_override(d, "model.name=other")
    assert d == {
        "data": {
            "max_length": 512,
            "sources": [{"name": "bfcl", "limit": 3, "categories": ["parallel", "live_simple"]}],
        },
        "model": {"name": "other"},
    }
    with pytest.raises(ConfigError):
        apply_override(d, "data.sources[5].limit=1")
    with pytest.raises(ConfigError):
        apply_override(d, "data.max_length")


@pytest.fixture()
def config_file(tmp_path):
    cfg = {
        "model": {"name": "ignored-because---tokenizer"},
        "train": {"steps": 1},
        "data": {
            "progress": False,
            "bad_row_max_fraction": 1.0,
            "eval_fraction": 0.5,
            "sources": [
                {"name": "hermes", "path": os.path.join(FIX, "hermes_function_calling_v1.json")},
                {"name": "gsm8k_hub", "path": os.path.join(FIX, "gsm8k_main.jsonl")},
            ],
        },
    }
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def test_cli_stats_json(config_file, capsys):
    assert cli.main(["--config", config_file, "--tokenizer", TOK, "--stats", "--json", "--set", "data.seed=2"]) == 0
    out = capsys.readouterr()
    st = json.loads(out.out)
    assert st["seed"] == 2 and st["rejected_rows"]["hermes"]["unknown_role"] == 1
    assert set(st["counts"]) == {"hermes", "gsm8k_hub"}
    assert "hermes: 8 rows" in out.err


def test_cli_stats_table(config_file, capsys, tmp_path):
    out_json = tmp_path / "stats.json"
    assert cli.main(["--config", config_file, "--tokenizer", TOK, "--stats", "--output", str(out_json)]) == 0
    table = capsys.readouterr().out
    st = json.loads(out_json.read_text())  # --output keeps the whole JSON
    assert len(table.splitlines()) < 40 and "{" not in table
    for source, by_type in st["counts"].items():  # one row per source and the step type it gives
        for t, by_split in by_type.items():
            if any(by_split.values()):
                row = next(line for line in table.splitlines() if line.startswith(source + " ") and t in line)
                assert row.split()[-3:] == [str(by_split[s]) for s in ("train", "eval", "eval_length_matched")]
    assert "rejected hermes: " in table and "unknown_role 1" in table


def test_stats_table_from_a_stats_dict():
    from layerroute.data.cli import stats_table

    pct = {"p0": 1, "p5": 2, "p25": 3, "p50": 4, "p75": 5, "p95": 6, "p100": 7, "mean": 4.0}
    stats = {
        "tokenizer": "tok", "max_length": 512, "eval_fraction": 0.1, "seed": 0, "eval_only_categories": [],
        "totals": {s: {"tool_call": 3, "planning": 2} for s in ("train", "eval", "eval_length_matched")},
        "counts": {"bfcl": {"tool_call": {"train": 3, "eval": 3, "eval_length_matched": 3},
                            "planning": {"train": 0, "eval": 0, "eval_length_matched": 0}},
                   "gsm8k": {"tool_call": {"train": 0, "eval": 0, "eval_length_matched": 0},
                             "planning": {"train": 2, "eval": 2, "eval_length_matched": 2}}},
        "categories": {"simple": {"train": 3, "eval": 3, "eval_length_matched": 3}},
        "length_percentiles": {"train": {"tool_call": {"context_length": pct, "step_length": pct,
                                                       "total_length": {}}}},
        "length_matched": {}, "rows": {"bfcl": {"rows": 1234, "steps": 3}}, "rejected_rows": {},
        "repaired_rows": {}, "dropped_too_long": {"bfcl": {"tool_call": 1231}},
        "dropped_too_long_by_category": {"simple": 1231},
    }
    lines = stats_table(stats).splitlines()
    assert next(line for line in lines if line.startswith("bfcl")).split() == [
        "bfcl", "tool_call", "1,234", "1,231", "0", "0", "3", "3", "3"]
    assert not any(line.startswith("bfcl") and "planning" in line for line in lines)  # bfcl gives no planning step
    assert next(line for line in lines if line.startswith("total") and "planning" in line).split() == [
        "total", "planning", "2", "2", "2"]
    assert next(line for line in lines if line.startswith("train")).split() == [
        "train", "tool_call", "4", "(2-6)", "4", "(2-6)", "-"]


def test_cli_show_marks_the_label_span(config_file, capsys):
    assert (
        cli.main(
            ["--config", config_file, "--tokenizer", TOK, "--show", "2", "--set", "data.eval_fraction=0.0"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("=====") == 2 and "tool_call" in out and "planning" in out
    assert out.count("⟦") == 2 and out.count("⟧") == 2
    assert "<|im_start|>assistant\n⟦" in out and "<|im_end|>⟧" in out


def test_cli_needs_a_model_name(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"data": {"sources": [{"name": "bfcl"}]}}))
    with pytest.raises(ConfigError, match="model.name"):
        cli.main(["--config", str(p), "--stats"])
