"""``python -m graphopt`` runs the command line."""

import sys

from graphopt.cli import main

sys.exit(main())
