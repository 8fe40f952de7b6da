"""Device profiles of machines other than the one running the tests, for planning tests whose
answer depends on the device (`mosaic plan --profile FILE` reads the same files)."""

from pathlib import Path

from mosaic_dllm.device import DeviceProfile

HERE = Path(__file__).parent
# The Intel AMX CPU that the engine's first rules were measured on (torch 2.13.0+cpu, 2 threads;
# benchmarks/README.md: GEMM rows differ between call sizes below a tile, attention blocks keep
# bits at >= 768 queries from multiples of 256, bf16 flash attention copies K and V per call).
INTEL_AMX = HERE / "intel-amx.json"


def intel_amx() -> DeviceProfile:
    return DeviceProfile.load(INTEL_AMX)
