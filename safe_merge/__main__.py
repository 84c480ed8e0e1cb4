"""`python -m safe_merge`: the safe-merge command."""

import sys

from safe_merge.cli import main

sys.exit(main())
