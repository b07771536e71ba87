#!/usr/bin/env python
"""Import a Llama-family Hugging Face model as a megasink checkpoint (see megasink/hf/importer.py)."""
import sys

from megasink.hf.cli import from_hf_main

if __name__ == "__main__":
    sys.exit(from_hf_main())
