"""Post-training: SFT, DPO and GRPO on the same pure functions as pretraining and decoding.

Modules: common (shared pieces below), sft, dpo, grpo (objective), grpo_train (loop and CLI),
rollout, rewards, tasks, evaluate. docs/design.md describes the conventions.
"""

from jaxlm.align.common import (entropy, masked_mean, masked_normalize, response_log_probs,
                                tokenize_prompt_and_output)
from jaxlm.align.grpo import compute_group_normalized_rewards, policy_gradient_loss

__all__ = ["compute_group_normalized_rewards", "entropy", "masked_mean", "masked_normalize",
           "policy_gradient_loss", "response_log_probs", "tokenize_prompt_and_output"]
