"""The peer of ``export_latency.py``: the same fixed-size encoder graph in ONNX Runtime, fp32 and dynamic int8.

fp32: ``torch.onnx.export`` (the dynamo exporter, opset 18) of the module the ``.pte`` is lowered from, run
with ONNX Runtime's CPU provider at full graph optimization. int8: ``onnxruntime.quantization.quantize_dynamic``
of that file (int8 per-channel weights, activations quantized per input at run time: MatMulInteger /
DynamicQuantizeMatMul), ONNX Runtime's standard post-training path. onnxruntime, onnx and onnxscript are
benchmark-only dependencies (the ``bench`` extra).
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def export_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path) -> float:
    """Write ``module`` at ``example``'s static shape to ``path`` (one file, weights inside); seconds taken."""
    t = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=18, external_data=False,
                          input_names=["image"], verbose=False)
    return time.perf_counter() - t


def quantize_int8(src: Path, dst: Path) -> float:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t = time.perf_counter()
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)
    return time.perf_counter() - t


def inference_session(path: Path, threads: int):
    """``path`` in ONNX Runtime's CPU provider, ``threads`` intra-op threads, full graph optimization."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def session(path: Path, threads: int, example: torch.Tensor) -> Callable[[], list[np.ndarray]]:
    """A zero-argument runner of ``path`` on ``example`` (inputs converted once, outside the timing)."""
    sess = inference_session(path, threads)
    feed = {sess.get_inputs()[0].name: example.numpy()}
    return lambda: sess.run(None, feed)


def matmul_rate(n: int, threads: int, warmup: int = 2, reps: int = 7) -> float:
    """fp32 FLOP/s of one n x n ``MatMul`` in ONNX Runtime (MLAS), median over ``reps``: on CPUs where MKL's
    ``torch.mm`` takes a slower path (AMD), MLAS's rate is the fp32 GEMM this machine can reach."""
    import tempfile

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = np.random.default_rng(0)
    b = numpy_helper.from_array(g.standard_normal((n, n), dtype=np.float32), "b")
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])], [b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "mm.onnx"
        onnx.save(model, str(path))
        sess = inference_session(path, threads)
        feed = {"a": g.standard_normal((n, n), dtype=np.float32)}
        for _ in range(warmup):
            sess.run(None, feed)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            sess.run(None, feed)
            ts.append(time.perf_counter() - t)
    return 2 * n**3 / float(np.median(ts))


def version() -> str:
    import onnxruntime as ort

    return ort.__version__
