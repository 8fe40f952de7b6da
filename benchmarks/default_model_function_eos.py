"""An experiment for #30 (not the shipped recipe): does training on whole functions, each followed
by EOS padding to a fixed window (the shape of LLaDA's SFT data), make Fast-dLLM's threshold
decoding reveal several tokens a pass on the default model?

The shipped default model saw 1,024-token windows of whole files, never an end: at threshold 0.9
it reveals one token a pass (1.000 passes per token). This fine-tunes its weights for `--minutes`
on the training files' function definitions (every `def`, dedented; those of at most `--window` -
1 tokens), each followed by EOS to `--window` tokens, with LLaDA's pre-training objective, then
measures, on the 8 function heads of `fast_decoding.py` (gen 64, blocks of 32, threshold 0.9, dual
cache): forward passes per generated token, over all 64 positions and over those before the first
EOS, for the shipped model and the fine-tuned one; and the held-out masked-token cross-entropy.

    python benchmarks/default_model_function_eos.py --minutes 12 \\
        --out benchmarks/results/default_model_function_eos.json
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fast_decoding import PROMPTS as HEADS  # noqa: E402

from mosaic_dllm import LLM, GenerationConfig, checkpoint  # noqa: E402
from mosaic_dllm.engine import default_model_path  # noqa: E402
from mosaic_dllm.train import corpus  # noqa: E402
from mosaic_dllm.train.trainer import evaluate, masked_diffusion_loss  # noqa: E402


def functions(text: str) -> list[str]:
    """Every function definition of a module's source, dedented (methods and nested ones too)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    lines = text.splitlines()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            out.append(textwrap.dedent("\n".join(lines[first : node.end_lineno])))
    return out


def samples(llm: LLM, texts: list[str], window: int) -> torch.Tensor:
    eos = llm.spec.eos_token_ids[0]
    rows = []
    for text in texts:
        for fn in functions(text):
            ids = llm.tokenizer.encode(fn)
            if 8 <= len(ids) < window:
                rows.append(ids + [eos] * (window - len(ids)))
    return torch.tensor(rows)


def passes_per_token(llm: LLM) -> dict:
    cfg = GenerationConfig(gen_length=64, block_length=32, steps=64, threshold=0.9, cache="dual", temperature=0.0)
    passes, before_eos, texts = 0, 0, []
    for head in HEADS:
        out = llm.generate(head, cfg)[0]
        passes += out.forward_passes
        before_eos += out.completion_tokens
        texts.append({"prompt": head, "completion": out.text})
    return {
        "forward_passes": passes,
        "passes_per_token": round(passes / (64 * len(HEADS)), 3),
        "tokens_before_first_eos": before_eos,
        "completions": texts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=12)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = LLM(default_model_path(), dtype="fp32")
    split = corpus.build()
    train = samples(base, split.texts(split.train), args.window)
    held = samples(base, split.texts(split.held_out), args.window)
    print(f"{len(train)} training functions, {len(held)} held out", file=sys.stderr)
    before = passes_per_token(base)

    spec = base.spec
    shipped = load_file(str(default_model_path() / "model.safetensors"))
    state = {k: v.float().requires_grad_() for k, v in shipped.items()}
    opt = torch.optim.AdamW(state.values(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    held_ce_before = evaluate(spec, state, held.reshape(-1), args.window, batches=4, batch_size=16)
    steps, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < args.minutes * 60:
        batch = train[torch.randint(0, len(train), (args.batch,), generator=gen)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _, _ = masked_diffusion_loss(spec, state, batch, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        if steps % 100 == 0:
            print(f"step {steps}: loss {float(loss):.3f}", file=sys.stderr)
    held_ce_after = evaluate(spec, state, held.reshape(-1), args.window, batches=4, batch_size=16)

    out_dir = Path(tempfile.mkdtemp(prefix="default-function-eos-"))
    checkpoint.save(out_dir, spec, {k: v.detach().to(torch.bfloat16) for k, v in state.items()})
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        (out_dir / name).write_bytes((default_model_path() / name).read_bytes())
    after = passes_per_token(LLM(out_dir, dtype="fp32"))
    record = {
        "train_functions": len(train),
        "held_out_functions": len(held),
        "window": args.window,
        "steps": steps,
        "minutes": args.minutes,
        "batch": args.batch,
        "lr": args.lr,
        "held_out_masked_ce_nats": {"shipped": round(held_ce_before, 3), "fine_tuned": round(held_ce_after, 3)},
        "shipped": before,
        "fine_tuned": after,
        "checkpoint": str(out_dir),
    }
    text = json.dumps(record, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
