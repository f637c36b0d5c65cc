"""tiny: a 2-layer model for CPU tests and demos (about 0.1M parameters).

Run: python -m jaxlm.accounting --config tiny --seq 128 --batch 8
Odd-sized dims (6 heads over 2 kv heads, head_dim 8, mlp 136) make a swapped axis fail loudly;
every dim still divides a tensor axis of 2 and an fsdp axis of 8.
"""

from jaxlm.config import Config, ModelConfig

CONFIG = Config(
    model=ModelConfig(
        vocab_size=512, embed_dim=48, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=8,
        mlp_dim=136, max_seq_len=256, rope_theta=10000.0, compute_dtype="float32",
    )
)
