"""``python -m bench [--quick] [--only W1,W3] [--out DIR]`` — see bench/README.md."""

import sys

from bench.suite import main

if __name__ == "__main__":
    sys.exit(main())
