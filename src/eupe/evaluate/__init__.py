"""``eupe evaluate``: frozen-encoder metrics (k-NN, linear seg and depth probes, keypoint PCK, distillation
fidelity), their report, and the quality gate against a baseline ``eval.json``."""
