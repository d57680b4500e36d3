"""Benchmark agents on gfenv tasks: ``python evaluate_agent.py --help`` (also installed as ``gfenv-evaluate``).

The command lives in ``gfenv.cli.evaluate``; this file runs it from a checkout.
"""

import sys

from gfenv.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
