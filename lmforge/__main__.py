"""`python -m lmforge` (and `torchrun -m lmforge pretrain ...`) run the CLI."""

import sys

from lmforge.cli import main

sys.exit(main())
