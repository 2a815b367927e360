"""`python -m reconciler.cli`: the same CLI as `lockgate` (used to run this very installation)."""

import sys

from reconciler.cli.main import main

sys.exit(main())
