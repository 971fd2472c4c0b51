"""`python -m moh_convert.train RECIPE.yaml [--set key=value] [--resume]` (also under `accelerate launch -m`):
the same as `moh train ...`."""
import sys

from ..cli import main

sys.exit(main(["train", *sys.argv[1:]]))
