"""``python -m fastflamingo.selftest``: see the package docstring."""
import sys

from . import main

sys.exit(main())
