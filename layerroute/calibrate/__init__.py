"""What is measured on a model before (or at the start of) training: block influence, single-block removal costs and
the static oracles built from them, and the closed-form fit of the skip bridges.

- ``influence``: ShortGPT block influence (`block_influence`, per row `RowInfluence`), removal costs (`drop_costs`,
  `skip_set_cost`), greedy and static skip targets.
- ``bridges``: `fit_bridges`: the skip bridges fitted to their blocks' residual updates (reduced-rank least squares).
- ``setup``: the measurements the trainer's setup takes (influence-spread router biases, static oracle targets,
  bridge fits), each from a `TrainConfig`.

Arrows: calibration runs its own forwards (`layerroute.nn` routing + `layerroute.nn.losses`) over collated steps
(`layerroute.data`); it never imports the evaluator (`layerroute.eval`) nor training (`layerroute.train`).
Nothing is imported here.
"""
