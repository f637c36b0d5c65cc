"""Byte-level BPE tokenizer: training (`train_bpe`) and encoding/decoding (`Tokenizer`).

See `bpe_train` for the training conventions (special tokens first, then the 256 bytes, then
one id per merge), `pretokenize` for the GPT-2 regex and safe chunking, and `tokenizer` for
the tiktoken fast path and its plain-Python reference.
"""

from jaxlm.tokenizer.bpe_train import train_bpe
from jaxlm.tokenizer.pretokenize import GPT2_PATTERN
from jaxlm.tokenizer.tokenizer import Tokenizer

__all__ = ["GPT2_PATTERN", "Tokenizer", "train_bpe"]
