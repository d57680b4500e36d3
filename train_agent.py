"""Train GFNet's stages on a gfenv task: ``python train_agent.py --help`` (also installed as ``gfenv-train``).

The command lives in ``gfenv.cli.train``; this file runs it from a checkout.
"""

import sys

from gfenv.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
