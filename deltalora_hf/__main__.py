"""``python -m deltalora_hf compare ...``: the same as the ``deltalora-hf`` console script."""

import sys

from .compare import main

if __name__ == "__main__":
    sys.exit(main())
