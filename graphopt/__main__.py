"""``python -m graphopt`` runs the command line."""

import sys

from graphopt.cli.entry import main

sys.exit(main())
