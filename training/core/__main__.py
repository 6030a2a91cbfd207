"""``python -m training.core <command>``: see ``training.core.cli``."""

import sys

from training.core.cli import main

if __name__ == "__main__":
    sys.exit(main())
