"""PyTorch's memory tracker (``torch.distributed._tools.mem_tracker.MemTracker``) made fit for a distillation step.

Two changes to the tracker as shipped, nothing else:

* **Frozen targets.** The stock tracker hooks the gradient of every parameter of a module it sees run, and fails
  on a parameter without gradient (a frozen teacher). Here a frozen parameter is counted as ``Other`` (reported as
  "frozen targets") and gets no hook; trained ones are ``Parameter`` with gradient hooks, as before.
* **Global peak only.** The stock tracker updates every module's local peak after every operator, which costs
  O(modules) per operator (minutes for a ViT-G step). The plan needs the step's peak, its breakdown at that
  moment and where in the step it happened, so only that is kept.

Every category is the tracker's own: parameters, buffers, gradients, activations (forward and recomputation),
temporaries (backward), optimizer state, other (here: frozen targets). Memory of a tensor is its storage size,
rounded to the CUDA caching allocator's 512-byte blocks when the tensors live on a (fake) CUDA device.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

TOTAL = "Total"

# The tracker's categories, as the plan names them.
CATEGORIES: dict[str, str] = {
    _MemRefType.PARAM.value: "trained params",
    _MemRefType.GRAD.value: "gradients",
    _MemRefType.OPT.value: "optimizer state",
    _MemRefType.OTH.value: "frozen targets",
    _MemRefType.BUFFER.value: "buffers",
    _MemRefType.ACT.value: "activations",
    _MemRefType.TEMP.value: "backward temporaries",
}


class StepTracker(MemTracker):
    """``MemTracker`` with frozen parameters counted apart and only the step's global peak recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "setup"  # set by the caller: which part of the step runs (reported with the peak)
        self.peak_phase = "setup"

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        def grad_hook(grad: Any) -> None:
            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

        param_mem = 0
        for p in module.parameters():
            ref = _MemRefType.PARAM if p.requires_grad else _MemRefType.OTH
            param_mem += sum(w.mem_consumed for w in self._update_and_maybe_create_winfos(p, ref))
            if p.grad is not None:
                self._update_and_maybe_create_winfos(p.grad, _MemRefType.GRAD)
            if p.requires_grad and install_grad_hooks and self._param_to_grad_hook_handles.get(p) is None:
                self._param_to_grad_hook_handles[p] = (
                    p.register_hook(grad_hook),
                    p.register_post_accumulate_grad_hook(lambda q: grad_hook(q.grad)),
                )
        buffer_mem = sum(w.mem_consumed for b in module.buffers()
                         for w in self._update_and_maybe_create_winfos(b, _MemRefType.BUFFER))
        return param_mem, buffer_mem

    def _update_peak_stats(self, peak_state: Any) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap[TOTAL]:
                self._peak_mem[dev] = snap[TOTAL]
                self._peak_mem_snap[dev] = dict(snap)
                self.peak_phase = self.phase

    def track_frozen(self, *tensors: Any) -> None:
        """Tensors of the frozen targets created outside the tracker (their parameters, already sharded or not)."""
        for t in tensors:
            self._update_and_maybe_create_winfos(t, _MemRefType.OTH)

    def track_gradients(self, *tensors: Any) -> None:
        """Gradient memory that is no parameter's ``.grad`` (DDP's bucket buffers)."""
        for t in tensors:
            self._update_and_maybe_create_winfos(t, _MemRefType.GRAD)

    def track_buffers(self, *tensors: Any) -> None:
        """Small constant tensors the step reads (feature statistics, input mean/std)."""
        for t in tensors:
            self._update_and_maybe_create_winfos(t, _MemRefType.BUFFER)

    def peak(self) -> tuple[int, dict[str, int]]:
        """Peak bytes on the busiest device and the breakdown at that moment, in the plan's names."""
        snaps = self.get_tracker_snapshot("peak")
        if not snaps:
            return 0, {}
        snap = max(snaps.values(), key=lambda s: s.get(TOTAL, 0))
        parts = {CATEGORIES[k.value if hasattr(k, "value") else k]: int(v) for k, v in snap.items() if k != TOTAL}
        return int(snap.get(TOTAL, 0)), parts
