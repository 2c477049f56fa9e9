"""``python -m unmask`` (and ``torchrun -m unmask train ...``)."""

import sys

from unmask.cli import main

sys.exit(main())
