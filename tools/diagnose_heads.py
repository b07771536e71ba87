#!/usr/bin/env python
"""Per-head importance of a megasink checkpoint or HF model directory (see megasink/diagnose.py)."""
import sys

from megasink.diagnose import main

if __name__ == "__main__":
    sys.exit(main())
