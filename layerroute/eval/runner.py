"""`run_eval`: load each adapter, evaluate it, write OUT/eval.json, report.md and plots (several adapters are
aggregated as seeds: `assemble`); `combine`: the same document from finished eval.json files, without evaluating."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from ..adapters import load_adapter, read_adapter_meta
from ..config import EvalConfig, ModelConfig
from ..errors import ConfigError
from .adapter import evaluate_adapter
from .io import read_per_adapter, write_json
from .seeds import aggregate_seeds
from .stage_cache import StageCache, directory_digest


def run_eval(adapters: list[str], data_cfg, cfg: EvalConfig, model_name: str | None, out_dir: Path, *,
             tokenizer: str | None = None, chat_template: str | None = None, dtype: str = "auto") -> dict:
    """Evaluate each adapter on the base model (its own unless `model_name`) loaded in `dtype` (model.dtype; 'auto'
    resolved by `load_base`; the dtype used is each adapter's result's `dtype`).

    `tokenizer` / `chat_template`: model.tokenizer / model.chat_template given explicitly, which each adapter
    must have been trained with (its own saved tokenizer and template are what it is evaluated with)."""
    from ..adapters import adapter_base_name
    from ..data.build import load_steps
    from ..identity import same_tokenizer, tokenizer_identity

    out_dir.mkdir(parents=True, exist_ok=True)
    per_adapter, data, loaded_tok = [], None, None
    for n, path in enumerate(adapters):
        meta = read_adapter_meta(path)
        rm = load_adapter(path, ModelConfig(name=model_name or adapter_base_name(path, meta), tokenizer=tokenizer,
                                            chat_template=chat_template, dtype=dtype))
        if data is None:
            data = load_steps(data_cfg, rm.tokenizer)
            loaded_tok = rm.tokenizer
        elif (not same_tokenizer(tokenizer_identity(rm.tokenizer), tokenizer_identity(loaded_tok))
              or rm.tokenizer.chat_template != loaded_tok.chat_template):  # the steps were rendered with the first's
            raise ConfigError(f"adapter {path} uses another tokenizer or chat template than {adapters[0]}; evaluate "
                              "them separately")
        # finished stages kept until eval.json is written: an interrupted run resumes from them (a changed adapter,
        # config or step set is not reused: each stage's key names what it depends on)
        cache = StageCache(out_dir / "partial" / f"adapter{n}",
                           {"adapter": directory_digest(path), "model": model_name, "eval": asdict(cfg),
                            **({"dtype": rm.dtype} if rm.dtype != "float32" else {})})  # fp32 keys as before
        res = evaluate_adapter(rm, data, cfg, meta, cache=cache)
        res["adapter"] = str(path)
        res["dtype"] = rm.dtype  # the frozen weights' dtype this evaluation ran in
        per_adapter.append(res)
        del rm
    doc = assemble(per_adapter, asdict(cfg), data.stats() if hasattr(data, "stats") else None)
    from .report import write_report

    write_json(out_dir / "eval.json", doc)
    write_report(doc, out_dir)
    shutil.rmtree(out_dir / "partial", ignore_errors=True)  # eval.json holds everything now
    return doc


def assemble(per_adapter: list[dict], eval_config: dict, data_report) -> dict:
    """One eval.json document from per-adapter results; several adapters are aggregated as seeds."""
    first = per_adapter[0]
    several = len(per_adapter) > 1
    doc = {
        **{k: v for k, v in first.items() if k != "adapter"},
        "adapters": [r["adapter"] for r in per_adapter],
        "seeds": per_adapter if several else [],
        "aggregate": aggregate_seeds(per_adapter) if several else None,
        "eval_config": eval_config,
        "data_report": data_report,
    }
    # headline fields at top level, from the full split (mean over seeds when several adapters)
    doc["skip_differential_points"] = (
        doc["aggregate"]["full"]["skip_differential_points"]["mean"] if several
        else first["splits"]["full"]["skip_differential_points"]
    )
    doc["per_layer_run_rate"] = first["splits"]["full"]["per_layer_run_rate"]
    return doc


def combine(paths: list[str], out_dir: Path) -> dict:
    """Aggregate finished evaluations (their eval.json files) as seeds, without evaluating again."""
    per_adapter = read_per_adapter(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    first = json.loads(Path(paths[0]).read_text())
    doc = assemble(per_adapter, first.get("eval_config", {}), first.get("data_report"))
    from .report import write_report

    write_json(out_dir / "eval.json", doc)
    write_report(doc, out_dir)
    return doc
