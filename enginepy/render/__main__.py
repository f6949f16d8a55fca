"""`python -m enginepy.render JOBS --out DIR ...`: the same as `enginepy render JOBS --out DIR ...`."""
import sys

from .command import main

sys.exit(main())
