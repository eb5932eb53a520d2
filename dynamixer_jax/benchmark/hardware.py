"""What machine a figure was measured on, and what its peak is.

The CPU's model and vector extensions (the speed of XLA:CPU and of torch depends on them), the
accelerator's datasheet bf16 peak (by its exact device kind: an unknown device gets no peak, never
a guess), and a matmul peak measured in the same run, for MFU.
"""

import platform
import time
from typing import Optional

import jax
import jax.numpy as jnp

from dynamixer_jax import preprocessing

# Dense bf16 tensor throughput from the vendors' datasheets, TFLOP/s (no sparsity), keyed by
# substrings of jax's device_kind, most specific first.
DATASHEET_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),  # NVIDIA H100 PCIe
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # NVIDIA H100 SXM5 (device_kind 'NVIDIA H100 80GB HBM3')
    ("GH200", 989.4),
    ("H200", 989.4),  # NVIDIA H200 SXM (the H100's compute, more memory)
    ("GB200", 2500.0),  # one Blackwell GPU of a GB200 superchip (1,200 W)
    ("B200", 2250.0),  # NVIDIA HGX B200 (1,000 W)
    ("A100", 312.0),  # NVIDIA A100 SXM and PCIe
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),  # the AWS variant of the A10
    ("A10", 125.0),
    ("TPU v6 lite", 918.0),  # Trillium (v6e), per chip
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v4", 275.0),
)
# Cloud VMs name their CPU "AMD EPYC" or "Intel(R) Xeon(R) Processor" whatever the generation, yet
# the CI kind's 2-core EPYCs ran a float32 matmul at 57-71 (Zen 1), ~190 (Zen 4: AVX-512 on 256-bit
# units) and 390-440 GFLOP/s (2026-12-05's AVX-512 EPYC). The (vendor, family, models) of
# /proc/cpuinfo name the microarchitecture, so that rows of one kind compare with each other.
MICROARCHITECTURES = (
    ("AuthenticAMD", 23, range(0x00, 0x30), "Zen 1"),  # Zen and Zen+ (Naples, Pinnacle Ridge)
    ("AuthenticAMD", 23, range(0x30, 0x100), "Zen 2"),  # Rome, Matisse, Renoir
    ("AuthenticAMD", 25, range(0x00, 0x10), "Zen 3"),  # Milan
    ("AuthenticAMD", 25, range(0x10, 0x20), "Zen 4"),  # Genoa
    ("AuthenticAMD", 25, range(0x20, 0x60), "Zen 3"),  # Vermeer, Rembrandt, Cezanne
    ("AuthenticAMD", 25, range(0x60, 0x80), "Zen 4"),  # Raphael, Phoenix
    ("AuthenticAMD", 25, range(0xa0, 0xb0), "Zen 4"),  # Bergamo, Siena
    ("AuthenticAMD", 26, range(0x00, 0x100), "Zen 5"),  # Turin, Granite Ridge
    ("GenuineIntel", 6, (0x55,), "Skylake-SP/Cascade Lake"),
    ("GenuineIntel", 6, (0x6a, 0x6c), "Ice Lake-SP"),
    ("GenuineIntel", 6, (0x8f,), "Sapphire Rapids"),
    ("GenuineIntel", 6, (0xcf,), "Emerald Rapids"),
    ("GenuineIntel", 6, (0xad, 0xae), "Granite Rapids"),
)
EXTENSIONS = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"),
              ("amx_tile", "AMX"), ("amx_bf16", "AMX-BF16"), ("asimd", "NEON"), ("sve", "SVE"))


def _cpuinfo() -> dict[str, str]:
  info = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  return info


def microarchitecture(info: dict[str, str]) -> Optional[str]:
  """e.g. 'family 25 model 17: Zen 4' from /proc/cpuinfo's fields, None without them."""
  try:
    family, model = int(info["cpu family"]), int(info["model"])
  except (KeyError, ValueError):
    return None
  for vendor, known_family, models, name in MICROARCHITECTURES:
    if info.get("vendor_id") == vendor and family == known_family and model in models:
      return f"family {family} model {model}: {name}"
  return f"family {family} model {model}"


def cpu_model(info: Optional[dict[str, str]] = None) -> str:
  """The CPU's name, with its family, model and microarchitecture where /proc/cpuinfo has them."""
  info = _cpuinfo() if info is None else info
  name = info.get("model name") or info.get("Model") or platform.processor() or platform.machine()
  arch = microarchitecture(info)
  return f"{name} ({arch})" if arch else name


def vector_extensions(info: Optional[dict[str, str]] = None) -> list[str]:
  info = _cpuinfo() if info is None else info
  flags = set((info.get("flags") or info.get("Features") or "").split())
  return [name for flag, name in EXTENSIONS if flag in flags]


def cpu_description() -> str:
  """e.g. 'AMD EPYC (family 25 model 17: Zen 4), 2 cores, AVX2 AVX-512 AVX512-BF16'."""
  info = _cpuinfo()
  extensions = " ".join(vector_extensions(info)) or "no AVX2/AVX-512/AMX"
  return f"{cpu_model(info)}, {preprocessing.host_cores()} cores, {extensions}"


def datasheet_peak_tflops(device_kind: str) -> Optional[float]:
  """The datasheet dense bf16 peak of a known accelerator, else None (CPUs included)."""
  for pattern, tflops in DATASHEET_BF16_TFLOPS:
    if pattern in device_kind:
      return tflops
  return None


def bf16_native(device) -> str:
  """Whether bfloat16 matmuls run in hardware on ``device`` (a short answer for the doctor)."""
  if device.platform == "tpu":
    return "yes (TPU)"
  if device.platform == "gpu":
    major = getattr(device, "compute_capability", "0").split(".")[0]
    return "yes" if major.isdigit() and int(major) >= 8 else f"no (compute capability {major})"
  ext = vector_extensions()
  if "AMX-BF16" in ext or "AVX512-BF16" in ext:
    return "yes (" + ", ".join(e for e in ext if "BF16" in e) + "; XLA:CPU may still emulate)"
  return "no (emulated in float32)"


def matmul_size(platform: str) -> int:
  """The side of the square matmul that measures a peak: big enough to saturate the device."""
  return 1024 if platform == "cpu" else 8192


def measure_matmul_tflops(dtype=jnp.bfloat16, size: Optional[int] = None,
                          repeats: int = 5) -> float:
  """The TFLOP/s of a square matmul on the default device, measured now (the peak for MFU)."""
  device = jax.devices()[0]
  size = size or matmul_size(device.platform)
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(matmul(a, b))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best / 1e12
