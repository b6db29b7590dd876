"""Write a deterministic tiny random S2 checkpoint (real on-disk format) for tests and the demo.

    python export/make_tiny_checkpoint.py OUT_DIR [--preset tiny|small] [--seed N] [--shards N]
"""

import sys

from fish_s2.cli import main

sys.exit(main(["make-tiny", *sys.argv[1:]]))
