"""7b: the shape of Llama 2 7B (Touvron et al. 2023): 32 layers, embed 4096, 32 heads.

Run: python -m jaxlm.accounting --config 7b --seq 4096 --batch 1 --mesh fsdp=8
head_dim 128, SwiGLU mlp 11008, vocab 32000, untied embeddings: 6.74B parameters.
"""

from jaxlm.config import Config, ModelConfig

CONFIG = Config(
    model=ModelConfig(
        vocab_size=32000, embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=32,
        mlp_dim=11008, max_seq_len=4096, rope_theta=10000.0, norm_eps=1e-5,
    )
)
