"""`python -m layerroute.serve ...` (same as `layerroute serve ...`)."""

import argparse
import sys

from . import __doc__ as _doc
from .cli import add_arguments, run

if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="layerroute serve", description=_doc.splitlines()[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
