"""The device check: what holds on the device that runs it, in a few minutes.

    python benchmarks/device_check.py [--device cuda] [--json benchmarks/results/device_check_<name>.json]

Measures the device's profile (`mosaic device`), then on tiny checkpoints of every family in bf16
and fp32: planned logits against eager's (bit for bit, or the largest difference), tokens of a
batch against each request alone, the measured peak of a step against its plan, and where the
arena lives. On a GPU it covers what CPU tests cannot (cuBLAS's call sizes, the SDPA backend's
query blocks, the caching allocator beside the arena); on a CPU it is run by the test suite
(tests/bench/test_device_check.py). Keep a GPU's output in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mosaic_dllm import LLM, GenerationConfig  # noqa: E402
from mosaic_dllm.device import profile_for  # noqa: E402
from mosaic_dllm.memory.rss import PeakMemory  # noqa: E402
from mosaic_dllm.runtime import EagerExecutor  # noqa: E402
from tests.tiny import build_tiny_checkpoint  # noqa: E402

FAMILIES = ("llada", "dream", "llada_moe")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def logits_check(llm: LLM, length: int) -> dict:
    """Planned logits of every row against the eager (official) forward's."""
    ids = torch.randint(0, 300, (1, length), generator=torch.Generator().manual_seed(2)).to(llm.device)
    eager = EagerExecutor(llm.spec, llm.checkpoint.weights).logits(ids)
    planned = torch.cat([lg.clone() for _, lg in llm.executor.row_logits(ids, torch.arange(length))], dim=1)
    diff = (planned.float() - eager.float()).abs().max().item()
    return {"bit_identical": bool(torch.equal(planned, eager)), "max_abs_diff": diff}


def batch_check(llm: LLM) -> dict:
    """A batch of three prompts against each alone: the same tokens."""
    cfg = GenerationConfig(gen_length=16, steps=8, temperature=0.5, seed=3)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [20] * 11]
    batched = [o.token_ids for o in llm.generate(prompts, cfg)]
    alone = [llm.generate([p], cfg)[0].token_ids for p in prompts]
    return {"batched_equals_alone": batched == alone}


def peak_check(llm: LLM) -> dict:
    """One generation's measured peak growth against its plan's predicted peak."""
    cfg = GenerationConfig(gen_length=64, steps=4)
    prompt = list(range(5, 160))
    plan = llm.check_memory(len(prompt), cfg)
    llm.generate([prompt], cfg)  # warm: kernels set up, arena mapped once
    llm.executor.release()
    with PeakMemory(llm.device) as measured:
        llm.generate([prompt], cfg)
    return {"predicted_peak_bytes": plan.predicted_peak_bytes, "measured_growth_bytes": measured.growth_bytes}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--json", help="write the record here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    start = time.perf_counter()
    profile = profile_for(device)
    profile.probe_all()
    record = {
        "device": profile.describe(),
        "fingerprint": profile.fingerprint,
        "profile_seconds": round(time.perf_counter() - start, 3),
        "attention": profile.data["attention"],
        "checks": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            path = Path(tmp) / family
            build_tiny_checkpoint(path, family, dtype=torch.float32, sharded=family == "dream")
            for name, dtype in DTYPES.items():
                llm = LLM(path, dtype=dtype, device=device, row_chunk=16)
                check = {"family": family, "dtype": name, "arena": llm.executor.arena.device.type}
                check |= logits_check(llm, 41) | batch_check(llm) | peak_check(llm)
                record["checks"].append(check)
                print(json.dumps(check), flush=True)
    record["seconds"] = round(time.perf_counter() - start, 1)
    print(f"{record['device']}: {len(record['checks'])} checks in {record['seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
