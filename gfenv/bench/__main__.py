"""``python -m gfenv.bench``: the command of ``gfenv.cli.bench``."""

import sys

from gfenv.cli.bench import main

sys.exit(main())
