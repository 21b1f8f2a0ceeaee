"""Inference: one generation core over a routed model.

- ``generate``: routed generation with a KV cache (one prompt or a padded batch), `load_for_inference`, the shared
  helpers (padding, inference weights, skip patterns).
- ``batched``: many agent steps, each with its own decision, stop tokens and budget, in batches of similar length.
- ``session``: multi-step agent sessions: one growing conversation, one decision per step, two cache policies.
- ``constrain``: schema-constrained decoding (xgrammar): tool calls and JSON that cannot be malformed.
- ``closer``: the budget rule: the shortest valid end of a constrained answer (`Closer`) kept within the tokens left
  (`BudgetRule`), asked by the grammar's logits processor and by the draft verify loop.
- ``stop``: the one stop rule (`StopRule.finish`) and finish-reason vocabulary every path (the serving scheduler and
  engine included) ends a row through; a row's tokens keep the end-of-turn token that ended it.
- ``drafts``: the lossless drafters (the grammar's forced text, prompt lookup, earlier turns) and the draft length.
- ``verify``: the draft verify loop: drafts checked by one forward under the grammar and its budget rule, so the
  tokens are plain (constrained) greedy decoding's.

Arrows: above `layerroute.nn`, `layerroute.adapters` and `layerroute.data` (rendering); never imports training or
serving. Nothing is imported here.
"""
