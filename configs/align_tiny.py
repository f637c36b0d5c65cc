"""align_tiny: the policy of the embedded arithmetic task (byte tokenizer, vocab 257).

Run: python -m jaxlm.grpo          (first SFT of this model on arithmetic, cached, then GRPO)
     python -m jaxlm.sft --task arithmetic --run-dir runs/arith-sft
The train section is the SFT recipe of that default run (two-digit + and -, jaxlm/align/tasks.py):
about 90-110 s on a 2-core CPU, greedy held-out accuracy 0.238 [0.213, 0.265] on 1000 problems, which
the default GRPO raises to 0.306 [0.278, 0.335] (docs/alignment_cpu.md).
"""

from jaxlm.config import Config, ModelConfig, TrainConfig

CONFIG = Config(
    model=ModelConfig(
        vocab_size=257, embed_dim=96, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=16,
        mlp_dim=256, max_seq_len=64, rope_theta=10000.0, compute_dtype="float32",
    ),
    train=TrainConfig(
        steps=300, batch_size=32, seq_len=63, lr=3e-3, warmup_steps=20, min_lr_ratio=0.1,
        weight_decay=0.0, clip_norm=1.0, checkpoint_every=1000,
    ),
)
