"""`make demo`'s plan: overrides reach every stage through one resolved config, and the benchmark times real eval
tool calls with the trained routers."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from layerroute.cli.demo import resolve_config, stages
from layerroute.errors import ConfigError

CONFIG = "configs/offline-smollm2.yaml"


def test_overrides_reach_every_stage_through_one_written_config(tmp_path):
    config = resolve_config(CONFIG, ["train.steps=7", "data.sources[2].limit=5"], tmp_path)
    assert Path(config) == tmp_path / "config.yaml"
    raw = yaml.safe_load(Path(config).read_text())
    assert raw["train"]["steps"] == 7 and raw["data"]["sources"][2]["limit"] == 5
    assert raw["eval"] == yaml.safe_load(Path(CONFIG).read_text())["eval"]  # the rest as given
    plan = {title: cmd for title, _, cmd in stages(config, tmp_path)}
    for title in ("data stats", "training", "evaluation"):
        assert plan[title][plan[title].index("--config") + 1] == config
    assert plan["data stats"][-1] == "--stats"  # the table, not --json


def test_no_override_reads_the_config_as_given(tmp_path):
    assert resolve_config(CONFIG, [], tmp_path) == CONFIG
    assert not (tmp_path / "config.yaml").exists()


def test_a_bad_override_names_its_key_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="train.stepz"):
        resolve_config(CONFIG, ["train.stepz=3"], tmp_path)


def test_the_benchmark_times_real_tool_calls_with_the_trained_routers(tmp_path):
    bench = {title: cmd for title, _, cmd in stages(CONFIG, tmp_path, bench_steps=4, bench_reps=2)}["benchmark"]
    assert bench[bench.index("--adapter") + 1] == str(tmp_path / "train" / "adapter")
    assert bench[bench.index("--steps-from") + 1] == CONFIG
    assert bench[bench.index("--step-type") + 1] == "tool_call"
    assert bench[bench.index("--n-steps") + 1] == "4" and bench[bench.index("--reps") + 1] == "2"
    assert "--json" not in bench  # a table on the terminal, the JSON in --output
