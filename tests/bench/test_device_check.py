"""benchmarks/device_check.py runs here as on a GPU, and what it reports holds on this device."""

import importlib.util
from pathlib import Path

import torch

from mosaic_dllm.device import profile_for

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "device_check.py"


def test_the_device_check_runs_on_this_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "check.json"
    record = module.main(["--device", "cpu", "--families", "llada,llada_moe", "--json", str(out)])
    assert out.exists() and record["checks"] and record["device"] == profile_for("cpu").describe()
    for check in record["checks"]:
        assert check["batched_equals_alone"] and check["arena"] == "cpu"
        assert check["measured_growth_bytes"] <= 1.25 * check["predicted_peak_bytes"] + (4 << 20)
        rules = profile_for("cpu").rules(getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[check["dtype"]]))
        # tests/tiny.py: 64 wide, experts 32
        moe_exact = check["family"] != "llada_moe" or rules.swiglu(64, 32).every_count
        if moe_exact:
            assert check["bit_identical"], check
        else:  # the stated tolerance (tests/runtime/test_planned_executor.py)
            assert check["max_abs_diff"] < 1e-3
