"""`python -m layerroute.train ...` (what `accelerate launch -m layerroute.train` runs), same as `layerroute train`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
