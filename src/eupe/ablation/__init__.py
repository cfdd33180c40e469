"""The paper's ablation (stage 2 only / 1+2 / 1+2+3, and the teaching-assistant chain) as ordinary steps."""
