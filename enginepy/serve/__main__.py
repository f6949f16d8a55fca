"""`python -m enginepy.serve [options]`: the same as `enginepy serve [options]`."""
import sys

from .cli import main

sys.exit(main())
