"""Known GPUs and their links, and NVML probing (optional: absent NVML is recorded, not an error).

Figures are vendor datasheet peaks (dense BF16 tensor TFLOPS, HBM bandwidth) and per-direction link
bandwidths, each with its datasheet link. Measured step-time coefficients never use them; the
rooflines in ``agentsim calibrate show``, the KV capacity estimate and *derived* profiles for a GPU
with no measured tables (:mod:`agentsim.calibration.derive`: measured times scaled by the ratio of
these figures) do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agentsim.calibration.profile import GPUSpec, Links


@dataclass(frozen=True, slots=True)
class GPUKind:
    """Datasheet figures (:class:`GPUSpec`), link bandwidths and the chip generation (``arch``:
    measured tables of the same generation are preferred when deriving a profile)."""

    spec: GPUSpec
    links: Links
    arch: str


GPUS: dict[str, GPUKind] = {
    # Links are per direction: (NVLink GB/s, PCIe GB/s, inter-node GB/s). Without NVLink, TP traffic
    # crosses PCIe, so ``nvlink_GBps`` holds the PCIe figure. memory_gib is the usable total nvidia-smi
    # reports where known (H200: 143,771 MiB), else the datasheet capacity.
    # A100 SXM4 80GB (DGX A100): NVLink3 600 GB/s both ways, PCIe gen4 x16, 200 Gb/s HDR IB per GPU.
    # https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
    "a100-80gb": GPUKind(GPUSpec("a100-80gb", 80.0, 2039.0, 312.0), Links(300.0, 25.0, 25.0), "ampere"),
    "a100-40gb": GPUKind(GPUSpec("a100-40gb", 40.0, 1555.0, 312.0), Links(300.0, 25.0, 25.0), "ampere"),
    # H100 SXM5 80GB (DGX H100): 3.35 TB/s HBM3, 989 dense BF16 TFLOP/s (1,979 with sparsity),
    # NVLink4 900 GB/s both ways, PCIe gen5 x16, 400 Gb/s NDR IB per GPU.
    # https://www.nvidia.com/en-us/data-center/h100/ (datasheet: resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet)
    "h100-80gb": GPUKind(GPUSpec("h100-80gb", 80.0, 3350.0, 989.0), Links(450.0, 50.0, 50.0), "hopper"),
    # H100 PCIe 80GB: 2.0 TB/s HBM2e, 756 dense BF16 TFLOP/s, NVLink bridge 600 GB/s (pairs), PCIe gen5.
    "h100-pcie": GPUKind(GPUSpec("h100-pcie", 80.0, 2000.0, 756.0), Links(300.0, 50.0, 50.0), "hopper"),
    # H100 NVL 94GB: 3.9 TB/s HBM3, 835 dense BF16 TFLOP/s, NVLink bridge 600 GB/s, PCIe gen5.
    "h100-nvl": GPUKind(GPUSpec("h100-nvl", 94.0, 3900.0, 835.0), Links(300.0, 50.0, 50.0), "hopper"),
    # H200 SXM 141GB: 4.8 TB/s HBM3e, 989 dense BF16 TFLOP/s (1,979 with sparsity), NVLink4 900 GB/s
    # both ways, PCIe gen5 x16, 400 Gb/s NDR per GPU. NVML name "NVIDIA H200"; nvidia-smi total
    # 143,771 MiB (our measurement, data/h200-torch/meta.json). https://www.nvidia.com/en-us/data-center/h200/
    "h200": GPUKind(GPUSpec("h200", 143771 / 1024, 4800.0, 989.0), Links(450.0, 50.0, 50.0), "hopper"),
    # H200 NVL 141GB (PCIe card): 4.8 TB/s HBM3e, 835 dense BF16 TFLOP/s, 2/4-way NVLink bridge 900 GB/s.
    # https://www.nvidia.com/en-us/data-center/h200/
    "h200-nvl": GPUKind(GPUSpec("h200-nvl", 141e9 / 2**30, 4800.0, 835.0), Links(450.0, 50.0, 50.0), "hopper"),
    # B200 (HGX/DGX B200) 180GB: 8 TB/s HBM3e, 2.25 dense BF16 PFLOP/s (4.5 with sparsity), NVLink5
    # 1.8 TB/s both ways, PCIe gen5 (gen6 on later boards), 400 Gb/s per GPU.
    # https://www.nvidia.com/en-us/data-center/hgx/ and https://www.nvidia.com/en-us/data-center/dgx-b200/
    "b200": GPUKind(GPUSpec("b200", 180e9 / 2**30, 8000.0, 2250.0), Links(900.0, 50.0, 50.0), "blackwell"),
    # L40S 48GB GDDR6: 864 GB/s, 362 dense BF16 TFLOP/s (733 with sparsity), no NVLink: TP over
    # PCIe gen4 x16 (64 GB/s both ways). https://www.nvidia.com/en-us/data-center/l40s/
    "l40s": GPUKind(GPUSpec("l40s", 48.0, 864.0, 362.0), Links(32.0, 32.0, 25.0), "ada"),
    # A10G (AWS G5) 24GB GDDR6: 600 GB/s, ~70 dense BF16 tensor TFLOP/s (no NVIDIA datasheet: AWS's
    # variant of the A10, which has 125), no NVLink, PCIe gen4 x16. https://aws.amazon.com/ec2/instance-types/g5/,
    # https://www.baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference/
    "a10g": GPUKind(GPUSpec("a10g", 24.0, 600.0, 70.0), Links(32.0, 32.0, 12.5), "ampere"),
}

# NVML device names -> kind, tried in order on the upper-cased name with "NVIDIA " removed. Real names:
# "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "NVIDIA A100-PCIE-40GB", "NVIDIA H100 80GB HBM3",
# "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA B200",
# "NVIDIA L40S", "NVIDIA A10G". Grace-Hopper (GH200), H800/H20 and the plain A10 are other chips
# with other figures: None rather than a wrong kind.
_NVML_RULES: tuple[tuple[str, str], ...] = (
    (r"^A100\b.*80G", "a100-80gb"),
    (r"^A100\b", "a100-40gb"),
    (r"^H100\b.*\bNVL\b", "h100-nvl"),
    (r"^H100\b.*\bPCIE\b", "h100-pcie"),
    (r"^H100\b", "h100-80gb"),
    (r"^H200\b.*\bNVL\b", "h200-nvl"),
    (r"^H200\b", "h200"),
    (r"^B200\b", "b200"),
    (r"^L40S\b", "l40s"),
    (r"^A10G\b", "a10g"),
)


def gpu_kind_from_name(nvml_name: str) -> str | None:
    """Map an NVML device name ("NVIDIA H200") to a key of :data:`GPUS`, or None for a GPU agentsim
    has no datasheet figures for (see ``_NVML_RULES`` for the names matched)."""
    n = re.sub(r"^NVIDIA\s+", "", nvml_name.strip().upper())
    for pattern, kind in _NVML_RULES:
        if re.search(pattern, n):
            return kind
    return None


def nearest_gpu(kind: str, candidates: list[str] | tuple[str, ...]) -> str:
    """The candidate GPU kind closest to ``kind``: one of the same ``arch`` if any, then the
    smallest ``|log(HBM ratio)| + |log(TFLOP/s ratio)|`` of datasheet figures (ties: the first
    candidate). Raises KeyError for an unknown kind."""
    import math

    g = GPUS[kind].spec

    def dist(c: str) -> float:
        s = GPUS[c].spec
        other_arch = GPUS[c].arch != GPUS[kind].arch
        return other_arch * 100.0 + abs(math.log(g.hbm_GBps / s.hbm_GBps)) + abs(math.log(g.peak_tflops / s.peak_tflops))

    return min(candidates, key=dist)


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
