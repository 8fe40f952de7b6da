"""Sequence and tensor parallel steps on 2 and 4 gloo processes: every rank's logits are the
one-process logits (eager ones for the eager kernels, the Mosaic executor's for the planned
sequence parallel), bit for bit where this device's kernels keep the bits (sequence parallel: a
row's at the shard's row count and attention's at a rank's head count; tensor parallel: a column's
at a rank's share of columns; measured here), else within the fp32 tolerance."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mosaic_dllm import checkpoint
from mosaic_dllm.bench.presets import preset
from mosaic_dllm.device import profile_for
from mosaic_dllm.kernels.sequence_parallel import check_heads, shard
from mosaic_dllm.models.groups import Chunks
from mosaic_dllm.plan.search import DoesNotFit
from mosaic_dllm.runtime import EagerExecutor, ExecutorOptions, MosaicExecutor

TOKENS = 37  # 19 / 18 tokens on 2 ranks, 10 / 10 / 10 / 7 on 4


def ids_of(batch: int) -> torch.Tensor:
    return torch.randint(0, 300, (batch, TOKENS), generator=torch.Generator().manual_seed(5))


CASES = [(family, dtype) for family in ("llada", "dream", "llada_moe") for dtype in ("bf16", "fp32")]


def batch_of(family: str) -> int:
    return 2 if family == "llada" else 1  # LLaDA: two sequences packed, as with guidance


# The planned runs: unchunked, and every token group in chunks with the LM head in chunks of 8
# rows (the sharded attention region's query blocks are the attention group's, the LM head
# gathers rows chunk by chunk).
PLANNED = {
    "planned": ExecutorOptions(),
    "planned_chunked": ExecutorOptions(row_chunk=8, chunks=Chunks(norms=2, projections=2, attention=2, ffn=2)),
}


def every_row(executor, ids: torch.Tensor) -> torch.Tensor:
    """(B, L, V) logits of every row, read through the sampler's interface."""
    return torch.cat([chunk.clone() for _, chunk in executor.row_logits(ids, torch.arange(ids.shape[1]))], dim=1)


GENERATION = {"gen_length": 16, "steps": 8, "temperature": 0.5, "seed": 7}


def generated_tokens(paths: dict, world: int | None) -> dict[str, torch.Tensor]:
    """Tokens each tiny family generates through the engine (sequence parallel across ranks, or one
    process), and the default model's (3 heads: tensor parallel across ranks)."""
    from mosaic_dllm import LLM

    runs = {family: ("sequence-parallel", path) for family, path in paths.items()}
    runs["default"] = ("tensor-parallel", None)
    one_process = {"sequence-parallel": "mosaic", "tensor-parallel": "mosaic"}
    tokens = {}
    for name, (executor, path) in runs.items():
        llm = LLM(path, executor=executor if world else one_process[executor])
        out = llm.generate("Return the", llm.default_config(**GENERATION))[0]
        tokens[name] = torch.tensor(out.token_ids)
        # Fast-dLLM's caches (a sequence-parallel rank keeps its heads' K and V)
        for cache in ("prefix", "dual") if executor == "sequence-parallel" else ("dual",):
            cfg = llm.default_config(**GENERATION, block_length=8, cache=cache, threshold=0.9)
            tokens[f"{name}_{cache}"] = torch.tensor(llm.generate("Return the", cfg)[0].token_ids)
    return tokens


def rank_main(rank: int, world: int, paths: dict, out: str) -> None:
    """One rank: every case's logits, saved by rank (one process group for all: spawning is the cost)."""
    from mosaic_dllm.runtime import (
        EagerSequenceParallelExecutor,
        EagerTensorParallelExecutor,
        SequenceParallelExecutor,
        TensorParallelExecutor,
    )

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=world)
    try:
        save_file(generated_tokens(paths, world), f"{out}.tokens.{rank}")
        for family, dtype in CASES:
            ck = checkpoint.load(paths[family], dtype=dtype)
            ids = ids_of(batch_of(family))
            logits = {
                "sequence": EagerSequenceParallelExecutor(ck.spec, ck.weights).logits(ids).contiguous(),
                "tensor": EagerTensorParallelExecutor(ck.spec, ck.weights).logits(ids).contiguous(),
            }
            if dtype == "fp32":  # weights read as this rank's rows: the same logits
                rows_read = checkpoint.load(paths[family], dtype=dtype, rank_rows=(rank, world)).weights
                logits["tensor_rows_read"] = EagerTensorParallelExecutor(ck.spec, rows_read).logits(ids).contiguous()
            for kind, options in PLANNED.items():
                logits[kind] = every_row(SequenceParallelExecutor(ck.spec, ck.weights, options), ids)
                if kind == "planned_chunked":  # tensor parallel's products do not depend on the chunking
                    logits[f"tensor_{kind}"] = every_row(TensorParallelExecutor(ck.spec, ck.weights, options), ids)
            for parallel in (SequenceParallelExecutor, TensorParallelExecutor) if (family, dtype) == CASES[0] else ():
                tight = parallel(ck.spec, ck.weights, ExecutorOptions(memory_budget=4096))
                try:  # refused on every rank before any collective, so no rank waits for another
                    every_row(tight, ids)
                except DoesNotFit as refused:
                    logits[f"refused_max_length_{parallel.name}"] = torch.tensor([refused.max_length])
            save_file(logits, f"{out}.{family}.{dtype}.{rank}")
    finally:
        dist.destroy_process_group()


def heads_keep_bits(dtype: torch.dtype, heads: int, kv_heads: int, world: int, head_dim: int) -> bool:
    """Whether attention over a rank's share of heads gives each head the all-heads call's bits (here)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, TOKENS, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(1, heads, TOKENS, head_dim, generator=g).to(dtype) for _ in range(2))
    whole = F.scaled_dot_product_attention(q, k, v)
    a = heads // world
    return all(
        torch.equal(
            F.scaled_dot_product_attention(q[:, s : s + a], k[:, s : s + a], v[:, s : s + a]), whole[:, s : s + a]
        )
        for s in range(0, heads, a)
    )


def columns_keep_bits(spec, dtype: torch.dtype, world: int) -> bool:
    """Whether F.linear with a rank's share of a weight's rows gives those columns the whole call's bits (here)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(TOKENS, max(spec.hidden_size, spec.q_size, spec.intermediate_size), generator=g).to(dtype)
    shapes = [(spec.q_size, spec.hidden_size), (spec.kv_size, spec.hidden_size), (spec.hidden_size, spec.q_size)]
    shapes += [(spec.intermediate_size, spec.hidden_size), (spec.hidden_size, spec.intermediate_size)]
    shapes += [(spec.vocab_size, spec.hidden_size)]
    if spec.moe is not None:
        e = spec.moe.expert_intermediate_size
        shapes += [(e, spec.hidden_size), (spec.hidden_size, e)]
    for n, k in shapes:
        w = torch.randn(n, k, generator=g).to(dtype)
        whole = F.linear(x[:, :k], w)
        rows = n // world
        for r in range(world):
            if not torch.equal(F.linear(x[:, :k], w[r * rows : (r + 1) * rows]), whole[:, r * rows : (r + 1) * rows]):
                return False
    return True


def exact_here(spec, dtype: torch.dtype, world: int) -> bool:
    """Every GEMM of the model keeps a row's bits in calls of a shard's rows, and attention in a rank's heads."""
    rows = min(e - s for s, e in (shard(TOKENS, r, world) for r in range(world)) if e > s)
    rules = profile_for("cpu").rules(dtype)
    widths = [(spec.hidden_size, spec.q_size), (spec.q_size, spec.hidden_size), (spec.hidden_size, spec.vocab_size)]
    if spec.moe is None:
        swiglu = rules.swiglu(spec.hidden_size, spec.intermediate_size)
        ok = swiglu.free and swiglu.min_rows <= rows
    else:  # the experts see however many tokens chose them: only a rule exact at every count keeps bits
        ok = rules.swiglu(spec.hidden_size, spec.moe.expert_intermediate_size).every_count
    ok = ok and all((r := rules.gemm(k, n)).free and r.min_rows <= rows for k, n in widths)
    return ok and heads_keep_bits(dtype, spec.num_heads, spec.num_kv_heads, world, spec.head_dim)


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_logits_equal_one_process(tiny_checkpoints, tmp_path, world):
    """LLaDA, Dream (grouped kv heads: on 4 ranks each query head reads one of 2 kv heads; qkv
    biases) and LLaDA-MoE, bf16 and fp32, on every rank, sequence parallel and tensor parallel;
    and the tokens the engine generates with them (the default model's too) are one process's."""
    paths = {family: str(tiny_checkpoints[family]) for family, _ in CASES}
    out = str(tmp_path / "sp")
    mp.spawn(rank_main, args=(world, paths, out), nprocs=world)
    torch.set_num_threads(1)
    alone = generated_tokens(paths, None)
    for rank in range(world):
        assert {k: v.tolist() for k, v in load_file(f"{out}.tokens.{rank}").items()} == {
            k: v.tolist() for k, v in alone.items()
        }
    for family, dtype in CASES:
        ck = checkpoint.load(paths[family], dtype=dtype)
        want = EagerExecutor(ck.spec, ck.weights).logits(ids_of(batch_of(family)))
        exact = {
            "sequence": exact_here(ck.spec, ck.dtype, world),
            "tensor": columns_keep_bits(ck.spec, ck.dtype, world),
        }
        # The planned kernels' calls keep a row's bits at any row count (the device profile's
        # tiles): against the one-process Mosaic executor, only attention by heads can differ.
        heads_exact = heads_keep_bits(ck.dtype, ck.spec.num_heads, ck.spec.num_kv_heads, world, ck.spec.head_dim)
        wanted = {"sequence": want, "tensor": want} | ({"tensor_rows_read": want} if dtype == "fp32" else {})
        exact["tensor_rows_read"] = exact["tensor"]
        for kind, options in PLANNED.items():
            wanted[kind] = every_row(MosaicExecutor(ck.spec, ck.weights, options), ids_of(batch_of(family)))
            exact[kind] = heads_exact
        wanted["tensor_planned_chunked"], exact["tensor_planned_chunked"] = wanted["planned_chunked"], exact["tensor"]
        for rank in range(world):
            got = load_file(f"{out}.{family}.{dtype}.{rank}")
            for name in ("sequence-parallel", "tensor-parallel") if (family, dtype) == CASES[0] else ():
                assert got[f"refused_max_length_{name}"].item() == 0  # nothing fits 4 KiB: every rank says so
            for kind, reference in wanted.items():
                if exact[kind]:
                    assert torch.equal(got[kind], reference), (kind, family, dtype, rank)
                else:
                    tol = 5e-5 * reference.abs().max().item()
                    torch.testing.assert_close(got[kind], reference, rtol=1e-5, atol=tol)


def test_heads_that_cannot_split_evenly_are_refused():
    check_heads(4, 2, 4)  # one query head a rank, reading one kv head
    check_heads(32, 8, 8)
    for heads, kv, world in ((4, 4, 3), (6, 2, 4), (12, 4, 8)):
        with pytest.raises(ValueError, match="split evenly"):
            check_heads(heads, kv, world)


def test_mosaic_generate_nproc_gives_the_one_process_tokens(tiny_checkpoints):
    """`mosaic generate --nproc 2 --executor sequence-parallel` launches two ranks through
    torch.distributed's launcher; rank 0 prints the tokens one process generates."""
    import json
    import os
    import subprocess
    import sys

    from mosaic_dllm import LLM, GenerationConfig
    from tests.processes import REPO

    path = tiny_checkpoints["dream"]
    flags = ["--gen-length", "12", "--steps", "6", "--seed", "3", "--temperature", "0.5"]
    argv = ["generate", "--model", str(path), "--prompt", "Return the", "--json", "--no-progress", *flags]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "mosaic_dllm.cli", *argv, "--executor", "sequence-parallel", "--nproc", "2"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 alone prints
    out = json.loads(lines[0])
    want = LLM(path).generate("Return the", GenerationConfig(gen_length=12, steps=6, seed=3, temperature=0.5))[0]
    assert out["token_ids"] == want.token_ids and out["executor"] == "sequence-parallel"


def test_plan_nproc_predicts_one_ranks_part(capsys):
    """`mosaic plan --nproc`: a rank's part of a sequence-parallel step, from shapes alone; at the
    same budget each, two ranks fit nearly twice the length, and a rank's plan at one length is
    smaller than one process's."""
    from mosaic_dllm.cli import main

    argv = ["plan", "--preset", "llada-8b", "--layers", "2", "--max-len", "--budget", "256MiB", "--json"]
    assert main([*argv, "--nproc", "1,2"]) == 0
    mosaic = json.loads(capsys.readouterr().out)["executors"]["mosaic"]
    two = mosaic["ranks"]["2"]
    assert two["max_len"] > 1.9 * mosaic["max_len"] and two["vs_ranks_times_one"] > 0.95
    assert two["predicted_peak_activation_bytes"] <= 256 << 20
    length = ["plan", "--preset", "llada-8b", "--layers", "2", "--length", "4096", "--json"]
    plans = {}
    for n in ("1", "2"):
        assert main([*length, "--nproc", n]) == 0
        plans[n] = json.loads(capsys.readouterr().out)
    assert plans["2"]["ranks"] == 2 and plans["2"]["arena_bytes"] < 0.6 * plans["1"]["arena_bytes"]
    assert main([*length, "--nproc", "2", "--cache", "dual"]) == 0  # a block cache joins a rank's plan
    assert json.loads(capsys.readouterr().out)["cache_bytes"] > 0


def test_plan_tp_plans_a_tensor_parallel_rank(capsys):
    """`mosaic plan --tp N`: a rank holds 1/N of each linear weight (whole activations): on a
    device whose memory one process's weights alone fill, two ranks have room for long requests."""
    from mosaic_dllm.cli import main
    from mosaic_dllm.models.quantized import weight_bytes

    argv = ["plan", "--preset", "llada-8b", "--layers", "2", "--max-len", "--device-memory", "3GiB", "--json"]
    assert main(argv) == 2  # one process: 2.74 GiB of weights and the 1 GiB reserve leave nothing
    assert "the weights alone" in capsys.readouterr().err
    assert main([*argv, "--tp", "2"]) == 0
    two = json.loads(capsys.readouterr().out)
    spec = preset("llada-8b", 2)
    # 2 layers: the embedding table (whole on every rank) is most of the weights
    assert two["tensor_ranks"] == 2 and two["weight_bytes"] == weight_bytes(spec, torch.bfloat16, tensor_ranks=2)
    assert 0.6 < two["weight_bytes"] / weight_bytes(spec, torch.bfloat16) < 0.7
    assert two["executors"]["mosaic"]["max_len"] > 1000
    assert main(["plan", "--preset", "llada-8b", "--layers", "2", "--length", "1024", "--tp", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["tensor_ranks"] == 2 and plan["predicted_peak_activation_bytes"] > 0


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--length", "64", "--nproc", "3"], "split evenly"),
        (["--length", "64", "--nproc", "0"], "rank counts >= 1"),
        (["--length", "64", "--nproc", "two"], "comma-separated rank counts"),
        (["--length", "64", "--nproc", "2,4"], "one rank count with --length"),
        (["--length", "64", "--tp", "3"], "divide evenly"),
        (["--length", "64", "--tp", "0"], "--tp takes a rank count >= 1"),
        (["--length", "64", "--tp", "2", "--nproc", "2"], "sequence and tensor parallel together"),
        (["--length", "64", "--tp", "2", "--quantize", "int8"], "not quantized yet"),
    ],
)
def test_plan_nproc_bad_input(flags, message, capsys):
    from mosaic_dllm.cli import main

    assert main(["plan", "--preset", "llada-8b", "--layers", "2", *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_tensor_parallel_rank_reads_only_its_rows(tiny_checkpoints):
    """`checkpoint.load(rank_rows=(rank, ranks))`: every row-split tensor is that rank's rows of the
    file's (read as a slice), every other tensor whole; the rank holds about 1/ranks of them."""
    from mosaic_dllm.models.weights import row_sharded_names

    path = tiny_checkpoints["llada_moe"]
    full = {}
    for file in sorted(path.glob("*.safetensors")):
        full |= load_file(str(file))
    whole = checkpoint.load(path).weights
    part = checkpoint.load(path, rank_rows=(1, 2)).weights
    split = row_sharded_names(checkpoint.read_spec(path)[0])
    assert split and all(full[n].shape[0] % 2 == 0 for n in split)

    def flat(w):
        tensors = [w.embed, w.final_norm, w.lm_head]
        tensors += [t for layer in w.layers for t in layer.values()]
        return tensors + [t for layer in w.experts for e in layer for t in e.values()]

    held = {id(t): t for t in flat(part)}
    for t_whole, t_part in zip(flat(whole), flat(part), strict=True):
        if t_part.shape == t_whole.shape:
            assert torch.equal(t_part, t_whole)
        else:
            rows = t_whole.shape[0] // 2
            assert torch.equal(t_part, t_whole[rows:])
    assert sum(t.nbytes for t in held.values()) < 0.62 * sum(t.nbytes for t in {id(t): t for t in flat(whole)}.values())


def alone_in_a_group(rank: int, paths: dict, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=1)
    try:
        save_file(generated_tokens(paths, 1), f"{out}.tokens")
    finally:
        dist.destroy_process_group()


def test_a_group_of_one_rank_runs_the_one_process_step(tiny_checkpoints, tmp_path):
    """`--nproc 1` (or torchrun with one process): the parallel executors plan and run one
    process's step, and give its tokens."""
    paths = {family: str(tiny_checkpoints[family]) for family in ("llada", "dream")}
    out = str(tmp_path / "one")
    mp.spawn(alone_in_a_group, args=(paths, out), nprocs=1)
    torch.set_num_threads(1)
    alone = generated_tokens(paths, None)
    assert {k: v.tolist() for k, v in load_file(f"{out}.tokens").items()} == {k: v.tolist() for k, v in alone.items()}
