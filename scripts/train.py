"""`asrkd train` as a script: `python scripts/train.py [options]` (see `--help`)."""

import sys

from asrkd.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
