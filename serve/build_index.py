"""`python -m serve.build_index`: the index-building command (serve/indexing/build.py)."""

import sys

from serve.indexing.build import main

if __name__ == "__main__":
    sys.exit(main())
