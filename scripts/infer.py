"""`asrkd infer` as a script: `python scripts/infer.py [options]` (see `--help`)."""

import sys

from asrkd.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
