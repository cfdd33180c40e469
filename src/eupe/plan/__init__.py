"""``eupe plan``: memory per GPU of every stage's training step, measured on fake tensors before renting GPUs.

step.py     one steady-state training step of a stage, the trainer's own functions, under the memory tracker
build.py    the stage's models without weights, on fake tensors (nothing allocated) or real CPU ones
tracker.py  PyTorch's MemTracker with frozen targets counted apart and only the global peak kept
autocast.py CUDA's bf16 autocast operator lists on CPU tensors
recommend.py the search for the largest micro-batch, sharding and checkpointing that fit
report.py   table, plan.json, plan.png
real.py     the same step on real CPU tensors, its peak from the CPU allocator (the plan's check)
"""
