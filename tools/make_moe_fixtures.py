"""Write the tiny Mixtral and Qwen3-MoE checkpoints and reference logits that tests/test_moe.py checks.

Needs transformers and a CPU torch (the tests themselves need neither):

    python tools/make_moe_fixtures.py [--out tests/golden/hf]

Same recipe as tools/make_hf_fixtures.py (seeded noise for every weight, float64 eager logits of
fixed input_ids [2, 19], float32 safetensors): 4 experts, top-2, so the checks exercise routing.

    mixtral    softmax router, top-2 weights renormalized, expert mlp = intermediate_size
    qwen3_moe  q/k RMSNorm, norm_topk_prob=false, moe_intermediate_size 24 (fine-grained),
               layer 0 dense (mlp_only_layers), head_dim 16

The router weights are scaled up so that top-2 choices are far from ties (a near tie would make
float32 and float64 pick different experts).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import transformers

from make_hf_fixtures import BATCH, SEQ_LEN, float64_logits, randomize, save_fixture

COMMON = dict(vocab_size=202, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
              tie_word_embeddings=False)
FIXTURES = {
    "mixtral": (transformers.MixtralConfig,
                dict(COMMON, intermediate_size=40, num_local_experts=4, num_experts_per_tok=2,
                     rope_theta=10000.0, sliding_window=None, router_aux_loss_coef=0.0)),
    "qwen3_moe": (transformers.Qwen3MoeConfig,
                  dict(COMMON, intermediate_size=56, moe_intermediate_size=24, num_experts=4,
                       num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1,
                       mlp_only_layers=[0], head_dim=16, rope_theta=20000.0,
                       router_aux_loss_coef=0.0)),
}
ROUTER_SCALE = 8.0


def build(config_class, fields: dict) -> torch.nn.Module:
    """Eager attention and eager experts (a loop over experts; grouped_mm has no float64)."""
    model = transformers.AutoModelForCausalLM.from_config(
        config_class(**fields), attn_implementation="eager", experts_implementation="eager")
    return model.to(torch.float32).eval()


def make_fixture(name: str, seed: int, out: Path) -> None:
    config_class, fields = FIXTURES[name]
    torch.manual_seed(seed)
    model = build(config_class, fields)
    randomize(model, seed)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith("mlp.gate.weight"):
                parameter.mul_(ROUTER_SCALE)
    input_ids = np.random.default_rng(seed).integers(0, fields["vocab_size"], (BATCH, SEQ_LEN))
    logits = float64_logits(model, input_ids)
    save_fixture(model, name, input_ids, logits, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "tests/golden/hf")
    args = parser.parse_args()
    for seed, name in enumerate(FIXTURES):
        make_fixture(name, 10 + seed, args.out)


if __name__ == "__main__":
    main()
