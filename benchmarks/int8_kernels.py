"""The matrix-multiply paths gmr_fast can choose between, on this CPU: speed and error.

    python benchmarks/int8_kernels.py --out benchmarks/results/int8_kernels_cpu.json
    python benchmarks/int8_kernels.py --isa avx512-vnni --out benchmarks/results/int8_kernels_vnni.json

Shapes are GMR-3B's MLP (4096 tokens x 2048 -> 11008, and 11008 -> 2048). Activations are
Gaussian with a few outlier channels (x50), as LLM hidden states have; weights Gaussian. Error is
the relative Frobenius error against an fp64 product. Contenders: torch fp32 and bf16 (oneDNN:
AMX / AVX512-BF16 where present), onnxruntime fp32 MatMul, onnxruntime DynamicQuantizeMatMul
(int8 weights per column, uint8 activations per tensor: QGEMM on AMX / VNNI / AVX2), the same
with activations quantized per row (MatMulInteger plus scaling ops) and MatMulNBits with 8-bit
weights and accuracy_level 4 (int8 compute with activations quantized per block of K).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from common import ISA_LIMITS, apply_isa, machine, write  # noqa: E402


def best_of(fn, n: int = 5) -> float:
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def session(nodes, inits, k: int, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def contenders(w: np.ndarray, k: int, n: int, threads: int) -> dict:
    import torch
    from onnx import helper, numpy_helper

    from export.quantize import quantize_columns

    torch.set_num_threads(threads)
    wt32, wtb = torch.from_numpy(w), torch.from_numpy(w).bfloat16()
    q, scale = quantize_columns(w)
    out = {"torch_fp32": lambda x: (torch.from_numpy(x) @ wt32).numpy(),
           "torch_bf16": lambda x: (torch.from_numpy(x).bfloat16() @ wtb).float().numpy()}
    fp32 = session([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(w, "w")], k, threads)
    out["ort_fp32"] = lambda x: fp32.run(None, {"x": x})[0]
    dq = session([helper.make_node("DynamicQuantizeMatMul", ["x", "q", "s", "z"], ["y"], domain="com.microsoft")],
                 [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "s"),
                  numpy_helper.from_array(np.zeros(n, np.int8), "z")], k, threads)
    out["ort_int8_per_tensor"] = lambda x: dq.run(None, {"x": x})[0]
    # per-row symmetric activations: scale_r = max|x_r| / 127, MatMulInteger, then both scales
    nodes = [helper.make_node("Abs", ["x"], ["ax"]), helper.make_node("ReduceMax", ["ax", "axes"], ["mx"], keepdims=1),
             helper.make_node("Div", ["mx", "c127"], ["sa"]), helper.make_node("Div", ["x", "sa"], ["xs"]),
             helper.make_node("Round", ["xs"], ["xr"]), helper.make_node("Cast", ["xr"], ["xq"], to=3),
             helper.make_node("MatMulInteger", ["xq", "q"], ["yi"]), helper.make_node("Cast", ["yi"], ["yf"], to=1),
             helper.make_node("Mul", ["yf", "sa"], ["y1"]), helper.make_node("Mul", ["y1", "s"], ["y"])]
    pr = session(nodes, [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "s"),
                         numpy_helper.from_array(np.array([-1], np.int64), "axes"),
                         numpy_helper.from_array(np.array(127.0, np.float32), "c127")], k, threads)
    out["ort_int8_per_row"] = lambda x: pr.run(None, {"x": x})[0]
    # the same with uint8 activations (value + 128, one zero point for every row): the U8S8 QGEMM path
    nodes_u8 = [n for n in nodes[:5]] + [
        helper.make_node("Add", ["xr", "c128"], ["xo"]), helper.make_node("Cast", ["xo"], ["xq"], to=2),
        helper.make_node("MatMulInteger", ["xq", "q", "zp"], ["yi"]), helper.make_node("Cast", ["yi"], ["yf"], to=1),
        helper.make_node("Mul", ["yf", "sa"], ["y1"]), helper.make_node("Mul", ["y1", "s"], ["y"])]
    pru = session(nodes_u8, [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "s"),
                             numpy_helper.from_array(np.array([-1], np.int64), "axes"),
                             numpy_helper.from_array(np.array(127.0, np.float32), "c127"),
                             numpy_helper.from_array(np.array(128.0, np.float32), "c128"),
                             numpy_helper.from_array(np.array(128, np.uint8), "zp")], k, threads)
    out["ort_int8_per_row_u8"] = lambda x: pru.run(None, {"x": x})[0]
    # MatMulNBits, 8-bit weights in blocks of 32 along K, accuracy level 4 (int8 compute)
    block = 32
    wb = w.T.reshape(n, k // block, block)
    bs = np.abs(wb).max(-1) / 127.0
    bs[bs == 0] = 1.0
    bq = (np.clip(np.rint(wb / bs[..., None]), -127, 127) + 128).astype(np.uint8)  # asymmetric storage, zero point 128
    nb = session([helper.make_node("MatMulNBits", ["x", "b", "bs"], ["y"], domain="com.microsoft", K=k, N=n, bits=8,
                                   block_size=block, accuracy_level=4)],
                 [numpy_helper.from_array(bq, "b"), numpy_helper.from_array(bs.reshape(-1).astype(np.float32), "bs")],
                 k, threads)
    out["ort_matmulnbits8_acc4"] = lambda x: nb.run(None, {"x": x})[0]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--isa", default="native", choices=sorted(ISA_LIMITS),
                   help="run as on a processor without AMX (common.ISA_LIMITS)")
    p.add_argument("--paths", help="comma-separated contenders to run (default: all); on a CPU without bf16 hardware "
                                   "torch_bf16 runs below 1 GOP/s, so time it apart at fewer --tokens")
    p.add_argument("--out", default="benchmarks/results/int8_kernels_cpu.json")
    a = p.parse_args(argv)
    apply_isa(a.isa)
    rng = np.random.default_rng(0)
    rows = []
    for k, n in ((2048, 11008), (11008, 2048)):
        x = rng.standard_normal((a.tokens, k), dtype=np.float32)
        x[:, rng.choice(k, 4, replace=False)] *= 50.0  # outlier channels
        w = (rng.standard_normal((k, n), dtype=np.float32) * 0.02).astype(np.float32)
        exact = x.astype(np.float64) @ w.astype(np.float64)
        for name, fn in contenders(w, k, n, a.threads).items():
            if a.paths and name not in a.paths.split(","):
                continue
            t = best_of(lambda: fn(x))
            err = float(np.linalg.norm(fn(x) - exact) / np.linalg.norm(exact))
            rows.append({"shape": f"{a.tokens}x{k}x{n}", "path": name, "seconds": t,
                         "gop_per_s": 2 * a.tokens * k * n / t / 1e9, "relative_error": err})
            print(f"{rows[-1]['shape']:>18} {name:>24} {rows[-1]['gop_per_s']:8.0f} GOP/s  error {err:.2e}", flush=True)
    write(a.out, {"machine": machine(), "threads": a.threads, "command": " ".join(sys.argv), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
