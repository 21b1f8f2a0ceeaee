"""`make demo`: the main job on the offline default, end to end.

Runs, in order, every stage that exists: parameter counts -> data stats -> training -> evaluation ->
benchmark, each writing under --output-dir. A stage whose module is not part of this checkout is reported and
skipped, never faked.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from .cli import main as cli_main


def _available(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("layerroute"):
            return False
        raise


def stages(config: str, out: Path) -> list[tuple[str, str, list[str]]]:
    from .config import RunConfig

    adapter = out / "train" / "adapter"
    cfg = RunConfig.from_yaml(config, [])  # the counts of what this config trains (router kind, bridges, LoRA rank)
    return [
        ("parameter counts", "layerroute.cli",
         ["params", "--model", cfg.model.name, "--router-kind", cfg.router.kind, "--lora-r", str(cfg.lora.r),
          "--bridge-rank", str(cfg.router.bridge_rank)]),
        ("data stats", "layerroute.data.cli", ["data", "--config", config, "--stats"]),
        ("training", "layerroute.train", ["train", "--config", config, "--output-dir", str(out / "train")]),
        ("evaluation", "layerroute.evaluate",
         ["eval", "--config", config, "--adapter", str(adapter), "--output-dir", str(out / "eval")]),
        ("benchmark", "layerroute.bench",
         # batch 1, 3 repetitions: a few minutes on 2 cores; `layerroute bench` alone does more
         ["bench", "--adapter", str(adapter), "--batch", "1", "--reps", "3", "--output", str(out / "bench.json")]),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/offline-smollm2.yaml")
    parser.add_argument("--output-dir", default="runs/demo")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for title, module, cmd in stages(args.config, out):
        if not _available(module):
            print(f"== {title}: skipped ({module} is not in this version)", flush=True)
            continue
        print(f"== {title}: layerroute {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        code = cli_main(cmd)
        print(f"== {title}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code != 0:
            return code
    report = out / "eval" / "report.md"
    if report.is_file():
        print(f"Report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
