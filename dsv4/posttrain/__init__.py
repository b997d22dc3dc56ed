"""Post-training: SFT, GRPO specialists and on-policy distillation (the V4 recipe)."""
