"""Evaluation that cannot fool itself: skip rates, perplexity in four configurations, free-running task accuracy,
equal-FLOP baselines, a threshold sweep, diagnostics, and several seeds.

`layerroute eval --adapter DIR [--adapter DIR2 ...] [--config YAML] --output-dir OUT` writes OUT/eval.json,
OUT/report.md and PNG plots.

Configurations, always on the same steps:
  base             LoRA off, every block runs (the frozen model)
  lora_full_depth  LoRA on, every block runs
  routed           LoRA on, the routers decide (hard gates, context only)
  routed_no_lora   LoRA off, the routers decide
Baselines at the routed model's FLOP budget (LoRA on): `shortgpt` removes the k blocks of lowest block influence
(1 - cos(h_in, h_out), measured on training steps), `random` skips k random blocks per step, where k is the
routed model's mean number of skipped blocks.

Modules (one job each):

- ``configurations``: the step types and configurations eval.json reports (`STEP_TYPES`, `PPL_CONFIGS`, ...).
- ``teacher_forced``: the teacher-forced pass of one configuration; `ppl`, `teacher_forced_exact`.
- ``accuracy``: free-running accuracy: batched generation with real skipping, scoring, paired differences.
- ``sampling``: which steps are scored: per type, capped, the accuracy draws; step and step-set keys.
- ``baselines``: the equal-FLOP baselines (ShortGPT, random) and the FLOP summary of some steps.
- ``diagnostics``: the differential's bootstrap interval, input dependence, gate / length correlation.
- ``adapter``: `evaluate_adapter`: every stage for one adapter, resumable through a `StageCache`.
- ``seeds``: one evaluation's headline numbers, flat (`seed_metrics`), and their mean / std over seeds.
- ``io``: read eval.json files with clear errors; write JSON atomically (`write_json`).
- ``runner``: `run_eval` (load, evaluate, write eval.json + report), `assemble`, `combine`.
- ``cli``: `layerroute eval` flags and entry point.
- ``report``: report.md, the tables and plots of one or several evaluations (`cost_table`).
- ``stage_cache``: `StageCache`: finished stages of an evaluation kept on disk, so a rerun resumes.
- ``ablation``: `layerroute ablation`: training recipes compared over seeds from finished evaluations.
- ``skip_curve``: `layerroute curve`: tool-call accuracy against blocks skipped (static removals, trained routers).
- ``bench``: `layerroute bench`: wall-clock latency of routed vs dense generation.

Nothing is imported here, so that importing one module does not import the others (and their dependencies).
"""
