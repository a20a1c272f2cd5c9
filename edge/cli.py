"""`python -m edge.cli ...`: the `edge` command (kept for `torchrun -m edge.cli`); it lives in `edge.commands.cli`."""
import sys

from edge.commands.cli import main

if __name__ == "__main__":
    sys.exit(main())
