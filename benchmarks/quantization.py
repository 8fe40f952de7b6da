"""Quantized weights: what they free for activations, what they cost in time, what they lose.

    python benchmarks/quantization.py plan        # weights and predicted L_max, 24 / 80 GiB, shapes only
    python benchmarks/quantization.py step        # llada-8b dims, 2 layers: load RSS and step time at L=2048
    python benchmarks/quantization.py agreement   # tokens and logits vs unquantized, tiny + wide, 100+ cases
    python benchmarks/quantization.py likelihood  # the default model's held-out log-likelihood per format

Each writes benchmarks/results/quantization_<part>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cli_json(argv: list[str]) -> dict:
    from mosaic_dllm.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0, argv
    return json.loads(out.getvalue())


def markdown(rows: list[dict], columns: list[str]) -> None:
    """The rows as a markdown table; byte counts (columns naming bytes or rss) in MiB."""
    in_mib = ["bytes" in c or "rss" in c for c in columns]
    print("\n| " + " | ".join(c + (" (MiB)" if m else "") for c, m in zip(columns, in_mib, strict=True)) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        cells = [f"{r[c] / 2**20:.0f}" if m else str(r[c]) for c, m in zip(columns, in_mib, strict=True)]
        print("| " + " | ".join(cells) + " |")


def plan(args) -> list[dict]:
    """`mosaic plan --max-len --device-memory`: weights bytes and L_max per format (shapes only)."""
    rows = []
    for preset in ("llada-8b", "dream-7b", "llada-moe-7b"):
        for memory in ("24GiB", "80GiB"):
            for fmt in ("none", "int8", "int4-g128"):
                argv = ["plan", "--preset", preset, "--max-len", "--device-memory", memory, "--quantize", fmt, "--json"]
                r = cli_json(argv)
                rows.append(
                    {
                        "preset": preset,
                        "device_memory": memory,
                        "weights": "bf16" if fmt == "none" else fmt,
                        "weight_gib": round(r["weight_bytes"] / 2**30, 2),
                        "activation_gib": round(r["budget_bytes"] / 2**30, 2),
                        "eager_max_len": r["executors"]["eager"]["max_len"],
                        "mosaic_max_len": r["executors"]["mosaic"]["max_len"],
                        "command": "mosaic " + " ".join(argv[:-1]),
                    }
                )
                print(rows[-1], flush=True)
    markdown(
        rows, ["preset", "device_memory", "weights", "weight_gib", "activation_gib", "eager_max_len", "mosaic_max_len"]
    )
    return rows


STEP_CHILD = """
import json, resource, sys, time, torch
from mosaic_dllm import LLM
path, fmt, length = sys.argv[1], sys.argv[2], int(sys.argv[3])
llm = LLM(path, dtype="bf16", quantize=None if fmt == "bf16" else fmt, memory_budget="8GiB")
from mosaic_dllm.models.quantized import weight_bytes
def resident():  # VmRSS: what the process holds now (weights left mapped from the file count too)
    line = next(x for x in open("/proc/self/status") if x.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024
load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
held = resident()
ids = torch.randint(0, 100000, (1, length), generator=torch.Generator().manual_seed(0))
rows = torch.arange(length // 2, length)
times = []
for _ in range(3):
    begin = time.perf_counter()
    for _ in llm.executor.row_logits(ids, rows):
        pass
    times.append(time.perf_counter() - begin)
print(json.dumps({"weights": fmt, "predicted_weight_bytes": weight_bytes(llm.spec, torch.bfloat16),
                  "load_peak_rss": load_peak, "rss_after_load": held, "step_seconds": times}))
"""


def step(args) -> list[dict]:
    """One first step (half the canvas masked, mask-only logits) at L = --length on llada-8b dims
    with --layers layers, random bf16 weights saved once; each format loads it in its own process."""
    import torch

    from mosaic_dllm.bench.presets import preset
    from mosaic_dllm.checkpoint import save
    from mosaic_dllm.models.weights import random_state_dict
    from mosaic_dllm.train.bpe import save_tokenizer, train_bpe

    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        spec = preset("llada-8b", args.layers)
        save(tmp, spec, random_state_dict(spec, torch.bfloat16, std=0.02))
        save_tokenizer(Path(tmp), train_bpe(["def f(x): return x"] * 4, "llada", vocab_size=300), "llada")
        for fmt in ("bf16", "int8", "int4", "int4-g128"):
            out = subprocess.run(
                [sys.executable, "-c", STEP_CHILD, tmp, fmt, str(args.length)],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["step_seconds_best"] = round(min(r["step_seconds"][1:]), 2)
            rows.append(r)
            print(r, flush=True)
    base = rows[0]["step_seconds_best"]
    for r in rows:
        r["vs_bf16"] = round(r["step_seconds_best"] / base, 2)
    print(f"\nllada-8b dims, {args.layers} layers, L={args.length}, bf16 activations, this CPU")
    markdown(
        rows, ["weights", "predicted_weight_bytes", "rss_after_load", "load_peak_rss", "step_seconds_best", "vs_bf16"]
    )
    return rows


def agreement(args) -> list[dict]:
    """Greedy tokens and one step's logits of the quantized model vs the unquantized one (bf16),
    over tiny checkpoints of each family and a 256-wide LLaDA, `--seeds` prompts each."""
    import torch

    from mosaic_dllm import LLM, GenerationConfig
    from mosaic_dllm.runtime import EagerExecutor
    from tests.tiny import build_tiny_checkpoint

    wide = dict(hidden_size=256, head_dim=64, rotary_dim=64, intermediate_size=512, std=0.2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = {}
        for name, family, sizes in (("llada", "llada", {}), ("dream", "dream", {}), ("wide", "llada", wide)):
            build_tiny_checkpoint(Path(tmp) / name, family, **sizes)
            checkpoints[name] = Path(tmp) / name
        for fmt in ("int8", "int4", "int4-g64"):
            for name, path in checkpoints.items():
                agree = total = 0
                errors = []
                base, quant = LLM(path, dtype="bf16"), LLM(path, dtype="bf16", quantize=fmt)
                cfg = GenerationConfig(gen_length=16, steps=16, **({} if name == "dream" else {"block_length": 16}))
                for seed in range(args.seeds):
                    g = torch.Generator().manual_seed(seed)
                    prompt = torch.randint(0, 300, (12,), generator=g).tolist()
                    a = base.generate(prompt, cfg)[0].token_ids
                    b = quant.generate(prompt, cfg)[0].token_ids
                    agree += sum(x == y for x, y in zip(a, b, strict=True))
                    total += len(a)
                    ids = torch.randint(0, 300, (1, 40), generator=g)
                    la = EagerExecutor(base.spec, base.checkpoint.weights).logits(ids).float()
                    lb = EagerExecutor(quant.spec, quant.checkpoint.weights).logits(ids).float()
                    errors.append(((la - lb).abs().max() / la.abs().max()).item())
                rows.append(
                    {
                        "weights": fmt,
                        "checkpoint": name,
                        "cases": len(errors),
                        "token_agreement": round(agree / total, 4),
                        "logits_rel_error_mean": round(sum(errors) / len(errors), 4),
                        "logits_rel_error_max": round(max(errors), 4),
                    }
                )
                print(rows[-1], flush=True)
    markdown(
        rows, ["weights", "checkpoint", "cases", "token_agreement", "logits_rel_error_mean", "logits_rel_error_max"]
    )
    return rows


def likelihood(args) -> list[dict]:
    """The default model's held-out log-likelihood (LLaDA's Monte Carlo estimator, the same draws
    for every format) in bf16 (PyTorch's CPU int8 / int4 kernels are ~50x slower in fp32):
    unquantized, int8, int4 in groups of 32 and 64 (its 192-wide layers take no groups of 128), and
    GGUF files of it (Q8_0; Q4_0, as Q4_K needs rows of 256 columns)."""
    from gguf import GGMLQuantizationType as Q

    from mosaic_dllm.engine import default_model_path
    from mosaic_dllm.tokenizer import Tokenizer
    from tests.tiny_gguf import write_gguf

    sys.path.insert(0, str(Path(__file__).parent))
    from default_model import held_out_texts
    from default_model import likelihood as likelihood_of

    model = default_model_path()
    texts = held_out_texts(model, args.held_out_bytes)
    # GGUF has no name for the default model's code pre-tokenizer: every format reads its own ids
    tokenizer = Tokenizer.from_dir(model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        formats = [
            ("bf16", str(model), None),
            ("int8", str(model), "int8"),
            ("int4-g32", str(model), "int4"),
            ("int4-g64", str(model), "int4-g64"),
        ]
        for kind in (Q.Q8_0, Q.Q4_0):
            formats.append((f"GGUF {kind.name}", str(write_gguf(model, Path(tmp) / f"{kind.name}.gguf", kind)), None))
        for name, path, fmt in formats:
            measured = likelihood_of(path, texts, args.mc_num, tokenizer, dtype="bf16", quantize=fmt)
            rows.append({"weights": name} | {k: measured[k] for k in ("tokens", "bits_per_token", "seconds")})
            print(rows[-1], flush=True)
    markdown(rows, ["weights", "tokens", "bits_per_token"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["plan", "step", "agreement", "likelihood"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--seeds", type=int, default=40, help="agreement: prompts per checkpoint")
    parser.add_argument("--mc-num", type=int, default=32, help="likelihood: Monte Carlo samples per window")
    parser.add_argument("--held-out-bytes", type=int, default=2000)
    parser.add_argument("--tmp", default=None, help="step: where the random checkpoint is written")
    args = parser.parse_args()
    rows = {"plan": plan, "step": step, "agreement": agreement, "likelihood": likelihood}[args.part](args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"quantization_{args.part}.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
