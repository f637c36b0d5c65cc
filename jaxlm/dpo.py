"""`python -m jaxlm.dpo`: Direct Preference Optimization on {prompt, chosen, rejected} JSONL (jaxlm/align/dpo.py)."""

import sys

from jaxlm.align.dpo import main

if __name__ == "__main__":
    sys.exit(main())
