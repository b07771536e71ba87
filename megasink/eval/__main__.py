"""``python -m megasink.eval``: the same as ``megasink eval``."""
import sys

from megasink.eval.harness import main

sys.exit(main())
