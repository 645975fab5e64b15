"""`python -m daop`: the `daop` command."""
import sys

from daop.cli import main

sys.exit(main())
