"""Edge latency of the shipped ``.pte`` against its peer, in one run on THIS machine: the FLOP floor, eager
PyTorch, ONNX Runtime fp32 and dynamic int8, ExecuTorch fp32 and int8 (XNNPACK), batch 1, per model and
input size, with the operators each ExecuTorch program leaves outside XNNPACK.

The exported graph is the one ``eupe export`` writes (``eupe.export.lower``: ``fixed_size`` +
``EncoderOutputs`` -> ``to_program`` -> ``lower_methods``, int8 as ``export.int8_activations``); the ONNX
file is exported from that same module (``ort_peer.py``). For each model and size the runners are
interleaved in rounds (one forward of each, in turn, ``--rounds`` times after ``--warmup`` rounds), so
that a burst of load from other processes hits them all alike, each call after a ``--gap-ms`` pause: ONNX
Runtime's intra-op threads spin after a run, and so do PyTorch's OpenMP threads, and on 2 cores a runner
timed straight after them loses the core they spin on (measured here: ExecuTorch 70 ms straight after ORT,
54 ms after a pause, ORT itself unchanged). The table shows medians and their ratios.
FLOP floor = the forward's FLOPs (``FlopCounterMode``, CPU attention counted as in ``train_throughput.py``)
/ this machine's fp32 GEMM rate measured in the same run: the faster of ``torch.mm`` (MKL) and ONNX Runtime's
``MatMul`` (MLAS), 2048 x 2048, median of samples taken before each model (MKL is not the fastest fp32 GEMM
on every CPU). Random weights: latency does not depend on them (int8 parity on trained weights is
the export tests' business). Every library runs ``--threads`` threads. ``--linears`` adds, per ViT, a row of
its blocks' linear layers alone (qkv, proj, fc1, fc2 chained on the token matrix, the same shapes): the GEMM
kernels of each library compared with nothing else in the graph. On a CPU with AMX-INT8 (Intel Xeon since
Sapphire Rapids) ONNX Runtime's int8 GEMMs use AMX tiles, which ExecuTorch's XNNPACK, AMD CPUs and phones do not
have; ``--amx-peer auto`` (the default there) adds ONNX Runtime's int8 once more in a child process refused
AMX (``no_amx.py``): the peer on its AVX-512 VNNI kernels, as a CPU without AMX runs it, in the same rounds.

    .venv/bin/python benchmarks/export_latency.py [--quick] [--models vit_s vit_b] [--sizes 256 512]
        [--threads 2] [--rounds 10] [--gap-ms 100] [--linears] [--plain] [--amx-peer auto|both|with]
        [--json out.json] [--png out.png]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import no_amx  # noqa: E402
import ort_peer  # noqa: E402
from args import non_negative, non_negative_number, one_line_errors, output_file, positive  # noqa: E402
from train_throughput import OtherLoad, _cpu_attention_flops, matmul_rate  # noqa: E402

from eupe import storage  # noqa: E402
from eupe.config import ExportConfig, ModelSpec  # noqa: E402
from eupe.errors import EupeError  # noqa: E402
from eupe.export.lower import EncoderOutputs, check_size, fixed_size, lower_methods, to_program  # noqa: E402
from eupe.export.runtime import load_forward, threads  # noqa: E402
from eupe.models.registry import build_model, check_model_name  # noqa: E402

MODELS = ["vit_t", "vit_s", "vit_b", "convnext_t", "convnext_b"]
SIZES = [256, 512]
QUICK = (["vit_s", "vit_b"], [256])
PEER_MODULES = ("onnxruntime", "onnx", "onnxscript")  # the bench extra
RUNNERS = ["eager", "ort_fp32", "et_fp32", "ort_int8", "et_int8"]


def cpu() -> dict:
    """The CPU model and the flags that decide which int8/bf16 kernels exist (from /proc/cpuinfo)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
    return {"model": name, "cores": len(os.sched_getaffinity(0)), "flags": [f for f in wanted if f in flags]}


def forward_flops(module: torch.nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops())
    with torch.inference_mode(), counter:
        module(x)
    return counter.get_total_flops()


class Linears(torch.nn.Module):
    """A ViT's block linears alone, chained on its token matrix ``[N, D]``: ``fc2(fc1(proj(qkv(x)[:, :D])))``
    per block, the same weights and GEMM shapes as the whole model's."""

    def __init__(self, vit: torch.nn.Module):
        super().__init__()
        self.dim = vit.embed_dim
        self.layers = torch.nn.ModuleList(m for b in vit.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(0, len(self.layers), 4):
            qkv, proj, fc1, fc2 = self.layers[i : i + 4]
            x = fc2(fc1(proj(qkv(x)[:, : self.dim])))
        return x


def bench(name: str, size: int, n_threads: int, warmup: int, rounds: int, work: Path, gap_s: float = 0.1,
          linears: bool = False, plain: bool = False, without_amx: bool = False) -> dict:
    torch.manual_seed(0)
    spec = ModelSpec(model=name, img_size=size)
    model = build_model(spec).eval()
    static = EncoderOutputs(fixed_size(model, spec, size)).eval()
    x = torch.randn(1, 3, size, size)
    if linears:
        tokens = static.model.patch_embed.num_patches + static.model.num_prefix_tokens
        static, x = Linears(static.model).eval(), torch.randn(tokens, static.model.embed_dim)
        name = f"{name} linears"
    row: dict = {"model": name, "size": size, "params": sum(p.numel() for p in static.parameters()),
                 "flops": forward_flops(static, x), "torch_mm_flop_per_s": matmul_rate(2048),
                 "ort_mm_flop_per_s": ort_peer.matmul_rate(2048, n_threads)}
    row["mm_flop_per_s"] = max(row["torch_mm_flop_per_s"], row["ort_mm_flop_per_s"])
    runners = {"eager": lambda: static(x)}

    stem = name.replace(" ", "_")
    onnx = work / f"{stem}_{size}.onnx"
    row["ort_fp32_export_s"] = ort_peer.export_onnx(static, x, onnx)
    row["ort_int8_export_s"] = ort_peer.quantize_int8(onnx, work / f"{stem}_{size}_int8.onnx")
    runners["ort_fp32"] = ort_peer.session(onnx, n_threads, x)
    runners["ort_int8"] = ort_peer.session(work / f"{stem}_{size}_int8.onnx", n_threads, x)
    if without_amx:  # ONNX Runtime's int8 in a child process refused AMX (no_amx.py): its VNNI kernels
        runners["ort_int8_noamx"] = no_amx.Session(work / f"{stem}_{size}_int8.onnx", n_threads, x, work)

    int8 = ExportConfig().int8_activations
    for dtype, rewrite in [(d, r) for r in ((True, False) if plain else (True,)) for d in ("fp32", "int8")]:
        key = f"et_{dtype}" if rewrite else f"et_{dtype}_plain"
        t = time.perf_counter()
        lowered = lower_methods({"forward": lambda d=dtype, r=rewrite: to_program(static, x, int8 if d == "int8" else None,
                                                                                  rewrite_modules=r)},
                                f"{name}_{size}_{dtype}")
        row[f"{key}_export_s"] = time.perf_counter() - t
        row[f"{key}_bytes"] = len(lowered.program)
        row[f"{key}_non_delegated"] = lowered.non_delegated
        row[f"{key}_subgraphs"] = lowered.subgraphs
        forward = load_forward(lowered.program, f"{name}_{dtype}")
        runners[key] = lambda f=forward: f(x)

    order = RUNNERS + [k for k in runners if k not in RUNNERS]  # the A/B runners (--plain) last in each round
    times: dict[str, list[float]] = {k: [] for k in order}
    load = OtherLoad()
    with torch.inference_mode():
        for i in range(warmup + rounds):
            for k in order:
                time.sleep(gap_s)  # the previous runner's spinning threads park
                t = time.perf_counter()
                out = runners[k]()
                ms = out if getattr(runners[k], "remote", False) else (time.perf_counter() - t) * 1e3
                if i >= warmup:
                    times[k].append(ms)  # a remote runner's own timing, without the pipe's round trip
    row["other_cpus"] = load.cores()
    for k in order:
        getattr(runners[k], "close", lambda: None)()
    for k in order:
        row[f"{k}_ms"] = statistics.median(times[k])
        row[f"{k}_runs_ms"] = times[k]
    del runners, static, model
    gc.collect()
    return row


def finish(rows: list[dict]) -> None:
    """Floors and ratios, from the median matmul rate of the whole run."""
    mm = statistics.median(r["mm_flop_per_s"] for r in rows)
    for r in rows:
        r["floor_ms"] = r["flops"] / mm * 1e3
        r["eager_x_floor"] = r["eager_ms"] / r["floor_ms"]
        r["et_fp32_x_floor"] = r["et_fp32_ms"] / r["floor_ms"]
        r["et_fp32_x_ort"] = r["et_fp32_ms"] / r["ort_fp32_ms"]
        r["et_int8_x_ort"] = r["et_int8_ms"] / r["ort_int8_ms"]
        r["et_int8_x_et_fp32"] = r["et_int8_ms"] / r["et_fp32_ms"]
        if "ort_int8_noamx_ms" in r:
            r["et_int8_x_ort_noamx"] = r["et_int8_ms"] / r["ort_int8_noamx_ms"]
        for dtype in ("fp32", "int8") if "et_fp32_plain_ms" in r else ():
            r[f"et_{dtype}_plain_x_ort"] = r[f"et_{dtype}_plain_ms"] / r[f"ort_{dtype}_ms"]


def _cpus(v: float | None) -> str:
    return "?" if v is None else f"{v:.1f}"


def table(rows: list[dict]) -> str:
    noamx = any("ort_int8_noamx_ms" in r for r in rows)
    head = ("| model | px | GFLOP | floor ms | eager ms (x floor) | ORT fp32 ms | ET fp32 ms (x ORT) | "
            "ORT int8 ms | ET int8 ms (x ORT) |" + (" ORT int8 without AMX ms (ET int8 x) |" if noamx else "") +
            " ET export s fp32/int8 | other CPUs |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['size']} | {r['flops'] / 1e9:.1f} | {r['floor_ms']:.1f} | "
            f"{r['eager_ms']:.1f} ({r['eager_x_floor']:.2f}x) | {r['ort_fp32_ms']:.1f} | "
            f"{r['et_fp32_ms']:.1f} ({r['et_fp32_x_ort']:.2f}x) | {r['ort_int8_ms']:.1f} | "
            f"{r['et_int8_ms']:.1f} ({r['et_int8_x_ort']:.2f}x) | " +
            (f"{r['ort_int8_noamx_ms']:.1f} ({r['et_int8_x_ort_noamx']:.2f}x) | " if "ort_int8_noamx_ms" in r else
             "n/a | " if noamx else "") +
            f"{r['et_fp32_export_s']:.0f}/{r['et_int8_export_s']:.0f} | "
            f"{_cpus(r['other_cpus'])} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    from eupe.plots import plt, save_figure

    labels = [f"{r['model']}\n{r['size']}px" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4.5), dpi=100)
    bars = list(zip(RUNNERS, ["tab:gray", "tab:blue", "tab:cyan", "tab:orange", "tab:red"]))
    if all("ort_int8_noamx_ms" in r for r in rows):
        bars.insert(4, ("ort_int8_noamx", "navajowhite"))
    width = 0.8 / len(bars)
    for i, (k, color) in enumerate(bars):
        ax.bar([j + (i - (len(bars) - 1) / 2) * width for j in range(len(rows))],
               [r[f"{k}_ms"] / r["floor_ms"] for r in rows], width,
               label=k.replace("_noamx", " without AMX").replace("_", " "), color=color)
    ax.axhline(1.0, color="black", linewidth=1, label="fp32 FLOP floor")
    ax.set_ylim(0, 1.3 * max(r[f"{k}_ms"] / r["floor_ms"] for r in rows for k, _ in bars))  # room for the legend
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("median latency / fp32 FLOP floor")
    ax.set_title("\n".join(textwrap.wrap(title, 100)), fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, ncols=3)
    save_figure(fig, path)


def check_inputs(models: list[str], sizes: list[int]) -> None:
    """Every model known to timm and every size one it can be exported at, before the first (minutes-long) row."""
    for name in models:
        check_model_name(name, "--models")
    for name in models:
        model = build_model(ModelSpec(model=name, img_size=max(sizes)), "--models")
        for size in sizes:
            check_size(model, ModelSpec(model=name, img_size=size), size, "--sizes")


@one_line_errors
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None, help=f"student aliases or timm names (default {MODELS})")
    ap.add_argument("--sizes", nargs="+", type=positive, default=None, help=f"input sizes in px (default {SIZES})")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK[0]} at {QUICK[1]} px unless --models/--sizes say")
    ap.add_argument("--threads", type=positive, default=2, help="threads of torch, ONNX Runtime and ExecuTorch's threadpool")
    ap.add_argument("--warmup", type=non_negative, default=2, help="untimed rounds")
    ap.add_argument("--rounds", type=positive, default=10, help="timed rounds (one forward of every runner each)")
    ap.add_argument("--gap-ms", type=non_negative_number, default=100.0,
                    help="pause before each timed call, for the previous runner's spinning threads to park")
    ap.add_argument("--linears", action="store_true", help="also a row of each ViT's block linears alone")
    ap.add_argument("--plain", action="store_true",
                    help="also time ExecuTorch programs lowered without eupe.export.blocks and .depthwise, in the same rounds (A/B)")
    ap.add_argument("--amx-peer", choices=["auto", "both", "with"], default="auto",
                    help="auto: on a CPU with AMX-INT8 also time ONNX Runtime's int8 refused AMX (no_amx.py), as on "
                         "every CPU without it; with: only as ONNX Runtime runs here")
    ap.add_argument("--json", type=output_file, default=None)
    ap.add_argument("--png", type=output_file, default=None)
    args = ap.parse_args(argv)
    models = args.models or (QUICK[0] if args.quick else MODELS)
    sizes = args.sizes or (QUICK[1] if args.quick else SIZES)
    check_inputs(models, sizes)
    missing = [m for m in PEER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise EupeError(f"{', '.join(missing)} not installed (the benchmark's peer, not a project dependency): "
                        ".venv/bin/python -m pip install -c constraints.txt -e '.[bench]'")
    from executorch.extension.pybindings import portable_lib

    torch.set_num_threads(args.threads)
    portable_lib._unsafe_reset_threadpool(args.threads)
    machine = cpu()
    without_amx = args.amx_peer == "both" or (args.amx_peer == "auto" and "amx_int8" in machine["flags"])
    with tempfile.TemporaryDirectory() as work:
        rows = []
        for name in models:
            for size in sizes:
                for alone in (False, True) if args.linears and "vit" in name else (False,):
                    rows.append(bench(name, size, args.threads, args.warmup, args.rounds, Path(work), args.gap_ms / 1e3,
                                      linears=alone, plain=args.plain and not alone, without_amx=without_amx))
                    r = rows[-1]
                    print(f"{r['model']} {size}px: eager {r['eager_ms']:.1f}, ORT {r['ort_fp32_ms']:.1f}/"
                          f"{r['ort_int8_ms']:.1f}, ET {r['et_fp32_ms']:.1f}/{r['et_int8_ms']:.1f} ms (fp32/int8), ET export "
                          f"{r['et_fp32_export_s']:.0f}/{r['et_int8_export_s']:.0f} s", flush=True)
                    if args.json:  # the rows so far: a long run cut short keeps what it measured
                        storage.write_json(str(args.json), {"benchmark": "export_latency", "partial": True, "cpu": machine,
                                                            "threads": args.threads, "rounds": args.rounds, "rows": rows})
    finish(rows)
    title = (f"{machine['model']}, {args.threads} threads, batch 1; torch {torch.__version__}, ExecuTorch "
             f"{threads()} threads, onnxruntime {ort_peer.version()}; median of {args.rounds} interleaved rounds, "
             f"{args.gap_ms:.0f} ms apart")
    rate = {k: statistics.median(r[k] for r in rows) / 1e9 for k in ("mm_flop_per_s", "torch_mm_flop_per_s",
                                                                      "ort_mm_flop_per_s")}
    print(f"\n{title}\nCPU flags: {' '.join(machine['flags'])}; fp32 GEMM 2048 (the floor's rate): "
          f"{rate['mm_flop_per_s']:.0f} GFLOP/s (torch.mm {rate['torch_mm_flop_per_s']:.0f}, ONNX Runtime MatMul "
          f"{rate['ort_mm_flop_per_s']:.0f})\n")
    print(table(rows))
    for r in rows:
        if "ort_int8_noamx_ms" in r:
            print(f"{r['model']} {r['size']}px ORT int8 refused AMX (VNNI kernels, as on a CPU without AMX; the same "
                  f"rounds): {r['ort_int8_noamx_ms']:.1f} ms; ET int8 {r['et_int8_x_ort_noamx']:.2f}x that")
    for r in rows:
        if "et_fp32_plain_ms" in r:
            print(f"{r['model']} {r['size']}px ET without eupe.export.blocks and .depthwise (the same rounds): fp32 "
                  f"{r['et_fp32_plain_ms']:.1f} ms ({r['et_fp32_plain_x_ort']:.2f}x ORT), int8 {r['et_int8_plain_ms']:.1f} ms "
                  f"({r['et_int8_plain_x_ort']:.2f}x ORT)")
    for r in rows:
        for dtype in ("fp32", "int8"):
            left = r[f"et_{dtype}_non_delegated"]
            print(f"{r['model']} {r['size']}px ET {dtype}: {r[f'et_{dtype}_subgraphs']} XNNPACK subgraph(s), outside "
                  f"XNNPACK: {', '.join(f'{k} x{v}' for k, v in left.items()) if left else 'nothing'}")
    out = {"benchmark": "export_latency", "cpu": machine, "threads": args.threads, "rounds": args.rounds,
           "warmup": args.warmup, "gap_ms": args.gap_ms, "torch": torch.__version__, "onnxruntime": ort_peer.version(),
           "int8_activations": ExportConfig().int8_activations, "rows": rows}
    if args.json:
        storage.write_json(str(args.json), out)
        print(f"wrote {args.json}")
    if args.png:
        plot(rows, args.png, title)
        print(f"wrote {args.png}")
    return out


if __name__ == "__main__":
    main()
