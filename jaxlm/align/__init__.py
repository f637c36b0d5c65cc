"""Post-training: SFT, DPO and GRPO on the same pure functions as pretraining and decoding."""
