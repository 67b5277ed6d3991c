"""`python -m hvagent.cli.hvctl`."""

import sys

from hvagent.cli.hvctl.main import main

sys.exit(main())
