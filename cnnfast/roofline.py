"""Roofline figures for cnnfast.benchmark: the ceilings measured in the run, the machine, each row's fraction of
its roofline bound, and the roofline plot."""
from __future__ import annotations

import datetime
import os
import platform

import numba
import numpy as np

from cnnfast.kernels.cpu.threads import njit


@njit(parallel=True)
def _parallel_copy(src, dst):
    for i in numba.prange(src.size):
        dst[i] = src[i]


def measure_ceilings(device, repeats=5):
    """{'sgemm_gflops', 'copy_gbytes', 'how'} measured now (medians): float32 GEMM (n^3, 2n^3 flops) and a device
    copy (bytes read + written). CPU: NumPy's BLAS at 2048, a parallel Numba copy of 256 MiB. CUDA: strict fp32
    SGEMM (cuBLAS through torch with TF32 off) at 8192 and a 1 GiB copy; None without torch (or its GPU). The GEMMs
    multiply random data."""
    from cnnfast.benchmark import time_cpu, time_interleaved, time_torch_cuda

    extra = {}
    if device == "cpu":
        n, size = 2048, 64 << 20
        rng = np.random.default_rng(0)  # random data: a GEMM of constants can run faster (less switching power)
        a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
        c = np.empty_like(a)
        src, dst = np.ones(size, np.float32), np.empty(size, np.float32)
        gemm, move = time_interleaved([(lambda: np.matmul(a, b, out=c), time_cpu),
                                       (lambda: _parallel_copy(src, dst), time_cpu)], repeats)
        how = f"NumPy matmul {n}^3 float32; Numba parallel copy of {size * 4 >> 20} MiB"
    else:
        try:
            import torch
        except ImportError:
            return None
        if not torch.cuda.is_available():  # (Numba's simulator)
            return None
        n, size = 8192, 256 << 20
        torch.backends.cuda.matmul.allow_tf32 = False
        a, b = torch.randn((n, n), device="cuda"), torch.randn((n, n), device="cuda")  # (as on the CPU)
        src, dst = torch.ones(size, device="cuda"), torch.empty(size, device="cuda")
        gemm = time_interleaved([(lambda: torch.matmul(a, b), time_torch_cuda)], repeats)[0]
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            tf32 = time_interleaved([(lambda: torch.matmul(a, b), time_torch_cuda)], repeats)[0]
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False
        move = time_interleaved([(lambda: dst.copy_(src), time_torch_cuda)], repeats)[0]
        how = (f"torch.matmul {n}^3 float32 (TF32 off: cuBLAS SGEMM; on: the TF32 ceiling of the torch-tf32 rows); "
               f"torch copy_ of {size * 4 >> 20} MiB")
        extra = {"tf32_gflops": 2 * n ** 3 / tf32 / 1e9}
        del a, b, src, dst
    return {"sgemm_gflops": 2 * n ** 3 / gemm / 1e9, **extra, "copy_gbytes": 2 * size * 4 / move / 1e9, "how": how}


def machine(device):
    """What the figures were measured on: date, CPU, GPU and driver, library versions, CUDA launch path."""
    info = {"date": datetime.date.today().isoformat(), "platform": platform.platform(),
            "cpu": _cpu_model(), "cpus": os.cpu_count(), "numpy": np.__version__, "numba": numba.__version__}
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:
        pass
    if device == "cuda":
        from numba import cuda

        from cnnfast.arrays import simulator_enabled
        from cnnfast.kernels.cuda import launch

        if simulator_enabled():
            info.update(gpu="Numba's CUDA simulator", launch="numba")
        else:
            gpu = cuda.get_current_device()
            info.update(gpu=gpu.name.decode() if isinstance(gpu.name, bytes) else str(gpu.name),
                        compute_capability=".".join(map(str, gpu.compute_capability)),
                        cuda_driver=".".join(map(str, cuda.cudadrv.driver.driver.get_version())),
                        launch="raw" if launch.raw_enabled() else "numba")
        if "torch" in info and torch.cuda.is_available():
            info["cudnn"] = torch.backends.cudnn.version()
            info["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    return info


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def roofline(row, ceilings):
    """The row's achieved GFLOP/s as a fraction of its roofline bound (None without ceilings): the TF32 GEMM
    ceiling for torch's TF32 rows where it was measured (tensor cores), else the strict fp32 SGEMM's."""
    if not ceilings or not row.get("bytes"):
        return None
    compute = ceilings.get("tf32_gflops") if row.get("provider") == "torch-tf32" else None
    bound = min(compute or ceilings["sgemm_gflops"], row["flops"] / row["bytes"] * ceilings["copy_gbytes"])
    return row["gflops"] / bound


def plot_roofline(rows, ceilings, path, title):
    """Roofline PNG: achieved GFLOP/s against arithmetic intensity (FLOP per byte moved) for cnnfast:auto and
    the baselines, under the measured SGEMM and copy ceilings."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    timed = [r for r in rows if "seconds" in r and r["bytes"]]
    intensity = [r["flops"] / r["bytes"] for r in timed]
    lo, hi = min(intensity) / 2, max(intensity) * 2
    xs = np.geomspace(lo, hi, 200)
    ax.plot(xs, np.minimum(ceilings["sgemm_gflops"], xs * ceilings["copy_gbytes"]), "k-", lw=1.5,
            label=f"roofline: {ceilings['sgemm_gflops']:.0f} GFLOP/s, {ceilings['copy_gbytes']:.0f} GB/s")
    if ceilings.get("tf32_gflops"):
        ax.plot(xs, np.minimum(ceilings["tf32_gflops"], xs * ceilings["copy_gbytes"]), "k--", lw=1,
                label=f"TF32 roofline (torch-tf32 rows): {ceilings['tf32_gflops']:.0f} GFLOP/s")
    markers = {"forward": "o", "backward_data": "s", "backward_filter": "^"}
    for provider, color in (("cnnfast:auto", "tab:blue"), ("torch", "tab:orange"), ("torch-tf32", "tab:green")):
        for primitive, marker in markers.items():
            pts = [(r["flops"] / r["bytes"], r["gflops"]) for r in timed
                   if r["provider"] == provider and r["primitive"] == primitive]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, color=color, s=28, label=f"{provider} {primitive}")
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP / byte, each tensor moved once)",
           ylabel="achieved GFLOP/s", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
