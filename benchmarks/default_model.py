"""The default model's card figures: held-out likelihood, completions of function heads, a long prompt.

    python benchmarks/default_model.py --compare /tmp/stage1_model /tmp/old_default_model \
        --json benchmarks/results/default_model.json

(1) Held-out likelihood: the first `--held-out-bytes` of each held-out standard-library file (the
    list in the model's training.json) scored by LLaDA's Monte Carlo estimator in lm-eval's rolling
    windows of each model's own context (`MosaicLM.loglikelihood_rolling`, `--mc-num` samples per
    window): bits per token, and bits per byte so that models with other tokenizers compare.
(2) Completions: function heads, the official sampler (low-confidence remasking), greedy.
(3) A long prompt: the first `--long-tokens` tokens of the longest held-out file, completed
    (`--long-gen` tokens, one block) with no long-context flag.
Forward passes per token under Fast-dLLM's threshold: benchmarks/fast_decoding.py.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

from fast_decoding import PROMPTS as HEADS

from mosaic_dllm import LLM, GenerationConfig
from mosaic_dllm.engine import default_model_path
from mosaic_dllm.evaluation import MosaicLM
from mosaic_dllm.train import corpus


def held_out_texts(model: Path, size: int) -> list[str]:
    names = json.loads((model / "training.json").read_text())["corpus"]["held_out_files"]
    root = corpus.stdlib_dir()
    return [(root / name).read_text(encoding="utf-8")[:size] for name in names]


def likelihood(model: Path, texts: list[str], mc_num: int, tokenizer=None, **engine) -> dict:
    """Held-out bits per token and per byte of `model` (a directory or a GGUF file); `engine`: LLM
    options (dtype, quantize); `tokenizer`: read the texts with this one instead of the model's."""
    lm = MosaicLM(str(model), mc_num=mc_num, mc_batch_size=mc_num, **engine)
    if tokenizer is not None:
        lm.llm.tokenizer = tokenizer
    begin = time.perf_counter()
    nats = -sum(lm.loglikelihood_rolling([SimpleNamespace(args=(t,)) for t in texts]))
    tokens = sum(len(lm.llm.tokenizer.encode(t)) for t in texts)
    size = sum(len(t.encode()) for t in texts)
    return {
        "model": str(model),
        "context": lm.llm.spec.max_position_embeddings,
        "texts": len(texts),
        "tokens": tokens,
        "bytes": size,
        "bits_per_token": round(nats / tokens / math.log(2), 4),
        "bits_per_byte": round(nats / size / math.log(2), 4),
        "seconds": round(time.perf_counter() - begin, 1),
    }


def completions(llm: LLM, gen: int, block: int) -> list[dict]:
    cfg = GenerationConfig(gen_length=gen, steps=gen, block_length=block)
    return [{"prompt": head, "completion": llm.generate(head, cfg)[0].text} for head in HEADS]


def long_prompt(llm: LLM, text: str, tokens: int, gen: int) -> dict:
    ids = llm.tokenizer.encode(text)[:tokens]
    out = llm.generate(ids, GenerationConfig(gen_length=gen, steps=gen, block_length=gen))[0]
    return {
        "prompt_tokens": len(ids),
        "prompt_tail": llm.tokenizer.decode(ids[-40:]),
        "completion": out.text,
        "seconds": round(out.seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument(
        "--compare", type=Path, nargs="*", default=[], help="other checkpoints scored on the same texts"
    )
    parser.add_argument("--held-out-bytes", type=int, default=4000)
    parser.add_argument("--mc-num", type=int, default=32)
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--long-tokens", type=int, default=1000)
    parser.add_argument("--long-gen", type=int, default=24, help="the long prompt's answer (1000 + 24 = the context)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    texts = held_out_texts(args.model, args.held_out_bytes)
    result = {"likelihood": [likelihood(m, texts, args.mc_num) for m in (args.model, *args.compare)]}
    print(json.dumps(result["likelihood"], indent=1), flush=True)
    llm = LLM(args.model)
    result["completions"] = completions(llm, args.gen, args.block)
    longest = max(held_out_texts(args.model, 10**9), key=len)
    result["long_prompt"] = long_prompt(llm, longest, args.long_tokens, args.long_gen)
    result["settings"] = vars(args) | {
        "model": str(args.model),
        "compare": [str(m) for m in args.compare],
        "json": None,
    }
    print(json.dumps({k: result[k] for k in ("completions", "long_prompt")}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
