"""125m: GPT-3 Small's shape (Brown et al. 2020, table 2.1) as a Llama block, GPT-2 vocabulary.

The layer scan is unrolled (faster training steps on GPU, longer compiles; docs/benchmarks.md).
Run: python -m jaxlm.accounting --config 125m --seq 2048 --batch 8
12 layers, embed 768, 12 heads of 64, SwiGLU mlp 2048 (about 8/3 x 768), vocab 50304 (GPT-2's
50257 padded to a multiple of 128). Untied embeddings: about 162M parameters, 85M in the blocks.
"""

from jaxlm.config import Config, ModelConfig

CONFIG = Config(
    model=ModelConfig(
        vocab_size=50304, embed_dim=768, num_layers=12, num_heads=12, num_kv_heads=12,
        mlp_dim=2048, max_seq_len=2048, rope_theta=10000.0,
        scan_unroll=12,
    )
)
