#!/usr/bin/env python
"""Command-line entry point; the code is in lns_megatron/training/growth.py (run with --help)."""

import os
import sys

try:
    import lns_megatron  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lns_megatron.training.growth import main

if __name__ == "__main__":
    sys.exit(main())
