"""`python -m realm ...`: the same as the `realm` command."""

import sys

from .cli import main

sys.exit(main())
