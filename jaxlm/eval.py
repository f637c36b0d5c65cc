"""`python -m jaxlm.eval`: accuracy on GSM8K / arithmetic and perplexity (jaxlm/align/evaluate.py)."""

import sys

from jaxlm.align.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
