"""``python -m engine.cli``: the same as ``netid``."""

import sys

from engine.cli import main

sys.exit(main())
