"""`python -m mmfast ...` (and `torchrun -m mmfast ...`): the same command line as `mmfast`."""
import sys

from .cli import main

sys.exit(main())
