"""`python -m layerroute.cli <command>`: the same as the `layerroute` console script."""

import sys

from .main import main

sys.exit(main())
