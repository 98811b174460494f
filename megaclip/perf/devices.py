"""The one accelerator table: peak throughput, memory and link bandwidths of known GPUs.

Used by the planner (``megaclip plan``), by training's MFU (GPUs found by name, see
:func:`datasheet_peak`) and by ``megaclip scaling predict`` (GPU-hours at a stated MFU).

Units: TFLOP/s (dense, no 2:4 sparsity), GiB of device memory as ``nvidia-smi`` reports it
(MiB / 1024), GB/s (10^9 bytes) for memory and links. Link bandwidths are *per GPU per
direction*: what one GPU can send while it receives as much.

Sources (vendor datasheets; "sparse" figures there are 2x the dense ones used here):
- A100 SXM4: NVIDIA A100 Tensor Core GPU datasheet (2021): FP32 19.5, TF32 156, BF16/FP16 312;
  HBM2 1,555 GB/s (40GB), HBM2e 2,039 GB/s (80GB); NVLink 3: 600 GB/s total = 300 per direction.
  DGX A100 user guide: 8x ConnectX-6 HDR 200 Gb/s compute NICs per node = 200 GB/s per node,
  i.e. 25 GB/s per GPU ("rail-optimised": one NIC per GPU).
- H100 SXM5: NVIDIA H100 Tensor Core GPU datasheet: FP32 67, TF32 494.7, BF16/FP16 989.4;
  HBM3 3.35 TB/s; NVLink 4: 900 GB/s total = 450 per direction. DGX H100: 8x ConnectX-7
  NDR 400 Gb/s = 50 GB/s per GPU.
- H200 SXM: NVIDIA H200 datasheet: same tensor throughput as H100 SXM, 141 GB HBM3e at
  4.8 TB/s, NVLink 900 GB/s; DGX H200: 8x ConnectX-7 400 Gb/s = 50 GB/s per GPU.
- Memory as reported by nvidia-smi: A100 40960 MiB, A100-80GB 81920 MiB, H100 SXM 81559 MiB,
  H200 143771 MiB.
"""

from __future__ import annotations

from dataclasses import dataclass

from megaclip.errors import ConfigError


@dataclass(frozen=True)
class Device:
    """One accelerator kind and the node it usually sits in (peaks, memory, links)."""

    name: str
    tflops_16: float  # dense BF16/FP16 tensor-core peak
    tflops_tf32: float  # dense TF32 tensor-core peak (fp32 matmuls with TF32 allowed)
    tflops_fp32: float  # FP32 without tensor cores
    memory_gib: float
    hbm_gbps: float  # device memory bandwidth, GB/s
    nvlink_gbps: float  # intra-node GPU-GPU bandwidth per direction, GB/s
    internode_gbps: float  # inter-node bandwidth per GPU per direction, GB/s
    gpus_per_node: int = 8
    note: str = ""

    def peak_flops(self, precision: str, tf32: bool = True) -> float:
        """Dense matmul peak in FLOP/s for ``precision`` (fp32: TF32 tensor cores if allowed)."""
        if precision in ("bf16", "fp16"):
            return self.tflops_16 * 1e12
        return (self.tflops_tf32 if tf32 else self.tflops_fp32) * 1e12

    @property
    def memory_bytes(self) -> float:
        """Device memory in bytes."""
        return self.memory_gib * 2**30

    @property
    def peak_bf16_flops(self) -> float:
        """Dense BF16 tensor-core peak in FLOP/s."""
        return self.tflops_16 * 1e12


DEVICES: dict[str, Device] = {
    d.name: d
    for d in (
        Device("a100-40gb", 312.0, 156.0, 19.5, 40.0, 1555.0, 300.0, 25.0, note="A100 SXM4 40GB"),
        Device("a100-80gb", 312.0, 156.0, 19.5, 80.0, 2039.0, 300.0, 25.0, note="A100 SXM4 80GB"),
        Device("h100-80gb", 989.4, 494.7, 66.9, 79.6, 3350.0, 450.0, 50.0, note="H100 SXM5 80GB"),
        Device("h200-141gb", 989.4, 494.7, 66.9, 140.4, 4800.0, 450.0, 50.0, note="H200 SXM"),
        # Placeholder so dry runs on a laptop work; its numbers mean nothing.
        Device("cpu", 1.0, 1.0, 1.0, 64.0, 100.0, 10.0, 10.0, 1, note="placeholder, not a model"),
    )
}


#: Short family names (``megaclip scaling predict --device h100``) -> a table entry; the
#: memory variants of a family share its peaks.
ALIASES: dict[str, str] = {"a100": "a100-80gb", "h100": "h100-80gb", "h200": "h200-141gb"}


def get_device(name: str, what: str = "gpu") -> Device:
    """The device called ``name`` or an alias (case-insensitive), else a ConfigError.

    ``what`` names the option in the error ("gpu" for ``--gpu``, "device" for ``--device``).
    """
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in DEVICES:
        raise ConfigError(f"unknown {what} '{name}'; valid: {', '.join([*DEVICES, *ALIASES])}")
    return DEVICES[key]


def device_for_name(device_name: str) -> Device | None:
    """The first table entry of the family (A100 / H100 / H200) in a reported GPU name."""
    upper = device_name.upper()
    for family in ("H200", "H100", "A100"):
        if family in upper:
            return next(d for d in DEVICES.values() if d.name.upper().startswith(family))
    return None


def datasheet_peak(device_name: str, precision: str, tf32: bool = True) -> tuple[float, str] | None:
    """(FLOP/s, source) of a GPU known by its reported name, or None (e.g. a CPU).

    fp32 uses the TF32 tensor-core figure when ``tf32`` (torch's matmul TF32 switch) is on.
    """
    dev = device_for_name(device_name)
    if dev is None:
        return None
    return dev.peak_flops(precision, tf32=tf32), f"table:megaclip.perf:{dev.name}"
