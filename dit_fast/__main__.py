"""`python -m dit_fast ...`: the dit-fast command line (see dit_fast.cli)."""
import sys

from .cli import main

sys.exit(main())
