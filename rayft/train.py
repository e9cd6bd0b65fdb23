"""`python -m rayft.train --config FILE [key.sub=value ...]`, the same as `rayft train`."""

import sys

from rayft.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
