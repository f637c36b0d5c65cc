"""`python -m jaxlm.sft`: supervised fine-tuning on response tokens (jaxlm/align/sft.py)."""

import sys

from jaxlm.align.sft import main

if __name__ == "__main__":
    sys.exit(main())
