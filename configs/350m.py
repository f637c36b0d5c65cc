"""350m: GPT-3 Medium's shape (Brown et al. 2020, table 2.1) as a Llama block with GQA.

The layer scan is unrolled (faster training steps on GPU, longer compiles; docs/benchmarks.md).
Run: python -m jaxlm.accounting --config 350m --seq 2048 --batch 8
24 layers, embed 1024, 16 heads of 64 over 8 kv heads, SwiGLU mlp 2816, vocab 50304.
"""

from jaxlm.config import Config, ModelConfig

CONFIG = Config(
    model=ModelConfig(
        vocab_size=50304, embed_dim=1024, num_layers=24, num_heads=16, num_kv_heads=8,
        mlp_dim=2816, max_seq_len=2048, rope_theta=10000.0,
        scan_unroll=24,
    )
)
