"""Known GPUs and their links, and NVML probing (optional: absent NVML is recorded, not an error).

Figures are vendor datasheet peaks (dense BF16 tensor TFLOPS, HBM bandwidth) and per-direction link
bandwidths; the step-time coefficients never use them (those are measured), only the rooflines in
``agentsim calibrate show`` and the KV capacity estimate do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agentsim.calibration.profile import GPUSpec, Links


@dataclass(frozen=True, slots=True)
class GPUKind:
    spec: GPUSpec
    links: Links


GPUS: dict[str, GPUKind] = {
    # A100 SXM4 80GB (DGX A100): NVLink3 600 GB/s both ways, PCIe gen4 x16, 200 Gb/s HDR IB per GPU.
    "a100-80gb": GPUKind(GPUSpec("a100-80gb", 80.0, 2039.0, 312.0), Links(300.0, 25.0, 25.0)),
    "a100-40gb": GPUKind(GPUSpec("a100-40gb", 40.0, 1555.0, 312.0), Links(300.0, 25.0, 25.0)),
    # H100 SXM5 80GB (DGX H100): NVLink4 900 GB/s both ways, PCIe gen5 x16, 400 Gb/s NDR IB per GPU.
    "h100-80gb": GPUKind(GPUSpec("h100-80gb", 80.0, 3350.0, 989.0), Links(450.0, 50.0, 50.0)),
    "h100-pcie": GPUKind(GPUSpec("h100-pcie", 80.0, 2000.0, 756.0), Links(300.0, 50.0, 50.0)),
    "h100-nvl": GPUKind(GPUSpec("h100-nvl", 94.0, 3900.0, 835.0), Links(300.0, 50.0, 50.0)),
}


def gpu_kind_from_name(nvml_name: str) -> str | None:
    """Map an NVML device name ("NVIDIA A100-SXM4-80GB") to a key of :data:`GPUS`, or None."""
    n = nvml_name.upper()
    if "A100" in n:
        return "a100-80gb" if "80G" in n else "a100-40gb"
    if "H100" in n:
        if "NVL" in n:
            return "h100-nvl"
        if "PCIE" in n:
            return "h100-pcie"
        return "h100-80gb"
    return None


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


class NVML:
    """GPU utilisation and memory via NVML when a GPU and ``pynvml`` exist; otherwise ``available`` is False."""

    def __init__(self) -> None:
        self.available = False
        self.reason = ""
        self.devices: list[dict] = []
        self._handles: list = []
        try:
            import pynvml  # nvidia-ml-py
        except ImportError:
            self.reason = "pynvml (nvidia-ml-py) not installed"
            return
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded ...
            self.reason = f"NVML unavailable: {e}"
            return
        if count == 0:
            self.reason = "no GPU"
            return
        self._nvml = pynvml
        for i in range(count):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            self._handles.append(h)
            self.devices.append({"index": i, "name": name, "memory_total_bytes": int(mem.total)})
        self.available = True

    def describe(self) -> dict:
        if not self.available:
            return {"available": False, "reason": self.reason}
        return {"available": True, "devices": self.devices}

    def sample(self, indices: list[int] | None = None) -> list[dict] | None:
        """Utilisation (%) and memory in use per device, or None without NVML."""
        if not self.available:
            return None
        out = []
        for i, h in enumerate(self._handles):
            if indices is not None and i not in indices:
                continue
            u = self._nvml.nvmlDeviceGetUtilizationRates(h)
            m = self._nvml.nvmlDeviceGetMemoryInfo(h)
            out.append({"index": i, "gpu_util_pct": int(u.gpu), "mem_util_pct": int(u.memory),
                        "mem_used_bytes": int(m.used)})
        return out
