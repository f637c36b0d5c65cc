"""`python -m jaxlm.grpo`: GRPO with verifiable rewards (jaxlm/align/grpo_train.py).

With no arguments it runs the embedded arithmetic task end to end on CPU.
"""

import sys

from jaxlm.align.grpo_train import main

if __name__ == "__main__":
    sys.exit(main())
