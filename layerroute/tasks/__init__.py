"""One module per benchmark: how its data is read, and how an answer to it is scored.

  bfcl.py             BFCL single-turn: load from the installed bfcl-eval package, BFCL function docs ->
                      OpenAI tool specs (JSON schema), gold calls from possible answers
  bfcl_ast.py         BFCL's AST checker (Python categories): `check_tool_calls`
  bfcl_multi_turn.py  BFCL multi-turn: the tasks, their executable backend, ground-truth call strings, checkers
  gsm8k.py            GSM8K (hub, local JSONL) and reasoning-gym's gsm_symbolic: load; final-number exact match
  turing.py           Turing-Open-Reasoning: load

The loaders are registered under their source names in `layerroute.data.sources.SOURCES`. Arrows: these modules
import `layerroute.data.records` / `config` / `toolcalls` (and each other); `layerroute.data.sources` imports them.
Nothing is imported here, so that importing one task does not import the others.
"""
