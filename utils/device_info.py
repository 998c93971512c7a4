"""What a run's device is: its dense fp16 peak (for the fraction of peak a step reaches) and the
software around it (torch, Triton, the driver, a C compiler), for benches and the GPU check."""
from __future__ import annotations

import os
import shutil
import sysconfig

import torch

from .misc import nvidia_driver

__all__ = ["PEAK_TFLOPS", "device_peak", "match_peak", "c_compilers", "c_compiler", "python_header", "environment"]

# Dense (no sparsity) FP16/BF16 tensor-core peaks, TFLOP/s, from the vendor's datasheets (which
# print the sparse figure, twice these), with the whole GPU's streaming multiprocessors: name
# fragment -> (device, peak, SMs, source). Checked in order. A MIG slice has the name of the whole
# GPU and fewer SMs; its peak is scaled by its share of them.
PEAK_TFLOPS: list[tuple[tuple[str, ...], tuple[str, ...], str, float, int, str]] = [
    # (all of these in the name, none of these in the name, device, peak, SMs, source)
    (("H200",), ("NVL", "GH200"), "H200 SXM", 989.4, 132,
     "NVIDIA H200 Tensor Core GPU datasheet (1,979 TFLOPS sparse)"),
    (("H100",), ("NVL", "PCIe", "GH200"), "H100 SXM", 989.4, 132,
     "NVIDIA H100 Tensor Core GPU datasheet, SXM (1,979 TFLOPS sparse)"),
    (("A100",), (), "A100", 312.0, 108, "NVIDIA A100 Tensor Core GPU datasheet (624 TFLOPS sparse)"),
]


def device_peak(device: torch.device) -> tuple[str, float | None, str]:
    """(device name, dense fp16 peak in TFLOP/s or None, source); a device with fewer SMs than the
    whole GPU (a MIG slice) gets the peak of its share."""
    if device.type != "cuda":
        return "CPU", None, ""
    name = torch.cuda.get_device_name(device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return match_peak(name, sms)


def match_peak(name: str, sms: int) -> tuple[str, float | None, str]:
    """:func:`device_peak` for a device ``name`` with ``sms`` streaming multiprocessors."""
    for need, avoid, label, peak, full, source in PEAK_TFLOPS:
        if all(n in name for n in need) and not any(a in name for a in avoid):
            if sms < full:
                return (f"{name} ({label}, {sms} of its {full} SMs: a MIG slice)", peak * sms / full,
                        f"{source}, times {sms}/{full} SMs")
            return f"{name} ({label})", peak, source
    return name, None, ""


def c_compilers() -> list[str]:
    """The C compilers looked for: ``$CC`` when set, else cc, gcc and clang."""
    return [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]


def c_compiler() -> str | None:
    """The path of the first C compiler found (:func:`c_compilers`), or None."""
    return next((found for found in map(shutil.which, c_compilers()) if found), None)


def python_header() -> str:
    """Where this Python's ``Python.h`` should be (it may be missing: no python3-dev)."""
    return os.path.join(sysconfig.get_paths()["include"], "Python.h")


def environment(device: torch.device) -> dict[str, str]:
    """torch, Triton, CUDA runtime and driver versions, the device and its peak, and whether a C
    compiler and the Python headers (which Triton needs) are present."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    name, peak, source = device_peak(device)
    header = python_header()
    return {"torch": torch.__version__, "triton": triton_version, "cuda runtime": str(torch.version.cuda),
            "driver": nvidia_driver() or "none found", "device": name,
            "peak": f"{peak:.1f} TFLOP/s dense fp16 ({source})" if peak else "unknown",
            "C compiler": c_compiler() or "none", "Python.h": header if os.path.isfile(header) else "missing"}
