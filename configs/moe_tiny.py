"""moe_tiny: the tiny preset with 8 fine-grained experts (top 2) in every layer but the first.

Run: python -m jaxlm.train --config moe_tiny
For CPU tests and demos: 3 layers (1 dense + 2 MoE), embed 48, experts of mlp 40, one shared
expert, Switch balance loss 0.01 and router z-loss 0.001.
"""

from jaxlm.config import Config, ModelConfig, TrainConfig

CONFIG = Config(
    model=ModelConfig(
        vocab_size=512, embed_dim=48, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=8,
        mlp_dim=136, max_seq_len=256, rope_theta=10000.0, compute_dtype="float32",
        num_experts=8, top_k=2, expert_mlp_dim=40, num_shared_experts=1, first_dense_layers=1,
        moe_balance_loss=0.01, moe_z_loss=0.001,
    ),
    train=TrainConfig(steps=300, batch_size=16, seq_len=128, lr=1e-2, warmup_steps=20,
                      eval_every=100, checkpoint_every=100),
)
