"""tests/scripts/train_tiny.py run the way the CLI runs a training: a run stopped by SIGTERM or SIGINT
(`lmforge.errors.Interrupted`, after the Trainer saved its checkpoint and said so) exits with status
128 + the signal's number, without a traceback. The subject of the SIGTERM test (tests/test_trainer.py).

    python tests/scripts/train_tiny_cli.py --data DATA --out RUN --max-steps 10 [--step-sleep 0.2]
"""

from __future__ import annotations

import sys

from train_tiny import main  # this script's directory is on sys.path

from lmforge.errors import Interrupted

if __name__ == "__main__":
    try:
        main()
    except Interrupted as stop:
        sys.exit(128 + stop.signum)
