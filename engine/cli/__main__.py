"""`python -m engine.cli`: the same as the `int8-studio` console script."""

import sys

from engine.cli import main

sys.exit(main())
