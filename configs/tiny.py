"""tiny: a 2-layer model for CPU tests and demos (about 0.1M parameters).

Run: python -m jaxlm.train            (this preset on the built-in corpus, all local devices)
     python -m jaxlm.accounting --config tiny --seq 128 --batch 8
Training 300 steps of 16 x 128 tokens on 2 CPU cores takes a couple of minutes; the loss falls
from ln(512) = 6.2 to about 3 (the standard library's source with a 512-token BPE).
Odd-sized dims (6 heads over 2 kv heads, head_dim 8, mlp 136) make a swapped axis fail loudly;
every dim still divides a tensor axis of 2 and an fsdp axis of 8.
"""

from jaxlm.config import Config, ModelConfig, TrainConfig

CONFIG = Config(
    model=ModelConfig(
        vocab_size=512, embed_dim=48, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=8,
        mlp_dim=136, max_seq_len=256, rope_theta=10000.0, compute_dtype="float32",
    ),
    train=TrainConfig(
        steps=300, batch_size=16, seq_len=128, lr=1e-2, warmup_steps=20, weight_decay=0.1,
        eval_every=100, eval_batches=4, checkpoint_every=100, default_corpus_bytes=1_000_000,
    ),
)
