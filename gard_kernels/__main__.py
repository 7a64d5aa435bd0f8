"""`python -m gard_kernels ...` runs the `gard` command line."""
import sys

from .cli import main

sys.exit(main())
