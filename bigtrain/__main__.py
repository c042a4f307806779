"""``python -m bigtrain ...``: the entry point every launcher uses (deepspeed --module, torchrun -m)."""

import sys

from bigtrain.cli import main

sys.exit(main())
