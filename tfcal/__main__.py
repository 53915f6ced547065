"""`python -m tfcal`: the same as the `tfcal` console script."""

import sys

from tfcal.cli import main

sys.exit(main())
