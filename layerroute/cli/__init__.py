"""The command line: `layerroute <command>` (the `layerroute` console script, `python -m layerroute.cli`).

- ``main``: the dispatcher, one sub-command per job (`COMMANDS`: the table of contents, module -> help).
- ``params``: `layerroute params` (parameter counts on the meta device).
- ``generate_cli``: `layerroute generate` (routed generation for one prompt).
- ``sweep``: `layerroute sweep` (train and evaluate several seeds, one table).
- ``demo``: `make demo` (`python -m layerroute.cli.demo`): the main job on the offline default, end to end.

The other commands keep their flags next to their code (`layerroute.train.cli`, `layerroute.eval.cli`, ...) and
register here by module name; nothing but the dispatcher's `main` is imported here.
"""

from .main import main

__all__ = ["main"]
