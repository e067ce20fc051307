"""`asrkd evaluate` as a script: `python scripts/evaluate.py [options]` (see `--help`)."""

import sys

from asrkd.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
