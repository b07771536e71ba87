#!/usr/bin/env python
"""Export a megasink checkpoint as a Hugging Face model directory (see megasink/hf/export.py)."""
import sys

from megasink.hf.cli import to_hf_main

if __name__ == "__main__":
    sys.exit(to_hf_main())
