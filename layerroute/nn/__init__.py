"""The network: plain torch and the routed wrapper around a model's decoder blocks.

- ``router``: the per-block router (`Router`) and the straight-through hard gate.
- ``routed``: `RoutedLayer` around each block (decision, training mix, real skip, KV policy), `wrap_model`,
  `routing(...)` (sets the per-forward routing state) and the gate records.
- ``state``: `RoutingState`, the state the routed layers share, and its verbs (`decisions`, `impose`,
  `take_rows`, `request_sums`), `Decisions` and `row_plan`: the only code besides `RoutedLayer` that touches a
  layer's per-step state.
- ``bridge``: `SkipBridge`, a low-rank stand-in for a skipped block, and `install_bridges` (fitting them needs data:
  `layerroute.calibrate.bridges`).
- ``blocks``: where each model family keeps its decoder blocks (`decoder_layers`).
- ``kv_cache``: `RoutedCache`, the KV cache every generation path uses.
- ``losses``: next-token losses computed only where labels are set (`sliced_lm_loss`, distillation, ...).

Arrows: imports nothing of the package but `layerroute.errors`: no data, no model loading (a test keeps it so).
Nothing is imported here.
"""
