"""Tasks as objects in one registry: one module per task, each owning its loading, rendering into steps (step type,
eval-only conversations), budget and scoring.

  base.py             `Task`, what a task is (imports nothing else of the package)
  registry.py         the registry: `task_for_source` (data), `task_for_step` (evaluation), `register`
  bfcl.py             BFCL single-turn: load from the installed bfcl-eval package, BFCL function docs ->
                      OpenAI tool specs (JSON schema), gold calls from possible answers; scored by BFCL's AST
                      checker (`bfcl_ast.py`, kept apart for size)
  bfcl_multi_turn.py  BFCL multi-turn: the tasks, their executable backend, ground-truth call strings, checkers
  gsm8k.py            GSM8K (hub, packaged or local JSONL): load; final-number exact match
  reasoning_gym.py    reasoning-gym's gsm_symbolic: generate; scored like GSM8K
  turing.py           Turing-Open-Reasoning: load; scored like GSM8K
  chats.py            function-calling chats for training (Hermes, Glaive, JSONL of messages): load; no scorer

Adding a task is one new module here whose `TASKS` lists its `Task` instances (the registry finds it), plus its
test. Arrows: the task modules import the public names of `layerroute.data.records` / `config` / `render` /
`toolcalls` (and each other); the data pipeline and evaluation ask `registry` only. Nothing is imported here, so
that importing one task does not import the others.
"""
