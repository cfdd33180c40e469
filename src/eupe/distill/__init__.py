"""The EUPE distillation: loss, frozen teacher normalization, checkpoints and the training loop."""
