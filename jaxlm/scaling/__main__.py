"""`python -m jaxlm.scaling fit|sweep ...`: see jaxlm/scaling/cli.py."""

import sys

from jaxlm.scaling.cli import main

sys.exit(main())
