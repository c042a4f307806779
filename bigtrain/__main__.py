"""``python -m bigtrain ...``: the entry point every launcher uses (deepspeed --module, torchrun -m)."""

import sys

from bigtrain.stopfile import EXIT_PREEMPTED, stop_requested

# First, before torch is imported: a worker group that torchrun restarts after a stop request
# (launch/torchrun_multinode.sh) exits at once, so the restarts cost seconds of SLURM's grace period.
if sys.argv[1:2] == ["train"] and (message := stop_requested()):
    print(message, file=sys.stderr)
    sys.exit(EXIT_PREEMPTED)

from bigtrain.cli import main  # noqa: E402

sys.exit(main())
