"""Weight-only int8 / int4: kernels against restated dequantized references within stated
tolerances; quantized models keep every exactness contract of the engine (mosaic equals eager bit
for bit, chunked or packed); plans count what the quantized kernels allocate; clear errors."""

import pytest
import torch
import torch.nn.functional as F

from mosaic_dllm import LLM, GenerationConfig
from mosaic_dllm.bench.presets import preset
from mosaic_dllm.cli import main
from mosaic_dllm.memory.accounting import LiveTensorTracker
from mosaic_dllm.models import quantized
from mosaic_dllm.models.quantized import (
    QuantizationError,
    QuantizedWeight,
    parse_quantization,
    quantize,
    quantized_names,
    weight_bytes,
)
from mosaic_dllm.models.spec import QuantScheme
from mosaic_dllm.runtime import EagerExecutor
from tests.helpers import joined

SCHEMES = [QuantScheme(8), QuantScheme(4, 32), QuantScheme(4, 64), QuantScheme(4, 128)]


def restated(w: torch.Tensor, scheme: QuantScheme, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weight, restated from the scheme's definition (float32 statistics; scales
    and zero points held in the compute dtype)."""
    w = w.float()
    if scheme.bits == 8:
        scale = (w.abs().amax(1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.round(w / scale[:, None]).clamp(-127, 127)
        return (q * scale.to(dtype).float()[:, None]).to(dtype)
    n, k = w.shape
    g = w.view(n, k // scheme.group, scheme.group)
    low, high = g.amin(-1), g.amax(-1)
    scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round((g - low[..., None]) / scale[..., None]).clamp(0, 15)
    zero = (low + 8 * scale).to(dtype).float()
    return ((q - 8) * scale.to(dtype).float()[..., None] + zero[..., None]).view(n, k).to(dtype)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("out_rows", [40, 256])  # 40: int4's CPU packing pads to 48 rows
def test_kernels_equal_the_dequantized_weight_within_rounding(scheme, dtype, out_rows):
    """dequantize() is the restated weight (bf16: bit for bit; fp32: the kernel may fuse the
    multiply-add, one ulp); the kernel's product is F.linear with it up to accumulation order
    (fp32: 1e-5 of the largest output; bf16: one bf16 rounding of the output, 1/128 of it)."""
    g = torch.Generator().manual_seed(out_rows)
    w = (torch.randn(out_rows, 256, generator=g) * 0.05).to(dtype)
    x = torch.randn(7, 256, generator=g).to(dtype)
    qw = quantize(w, scheme)
    ref = restated(w, scheme, dtype)
    if dtype == torch.bfloat16:
        assert torch.equal(qw.dequantize(), ref)
    else:
        torch.testing.assert_close(qw.dequantize(), ref, rtol=1e-6, atol=1e-7)
    want = F.linear(x.float(), ref.float())
    tol = (1e-5 if dtype == torch.float32 else 1 / 64) * want.abs().max().item()
    torch.testing.assert_close(qw.linear(x).float(), want, rtol=0, atol=tol)
    step = (w.float().abs().amax() / 127) if scheme.bits == 8 else (w.float().amax() - w.float().amin()) / 15
    assert (ref.float() - w.float()).abs().max() <= step / 2 * 1.02 + 1e-2 * w.float().abs().max()  # half a step


@pytest.mark.parametrize("scheme", SCHEMES[:2], ids=lambda s: s.name)
def test_the_per_call_dequantizing_path_computes_the_same_weight(monkeypatch, scheme):
    """Off CPU (CUDA) a call dequantizes the weight, held as plain nibbles; on CPU it must give the
    weight the packed kernel reads (bf16: bit for bit)."""
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    packed = quantize(w, scheme).dequantize()
    monkeypatch.setattr(quantized, "kernel_of", lambda device: "dequantize")
    plain = quantize(w, scheme)
    assert torch.equal(plain.dequantize(), packed)
    x = torch.randn(5, 128).to(torch.bfloat16)
    assert torch.equal(plain.linear(x), F.linear(x, packed))


def test_quantization_names_parse_and_refuse():
    assert parse_quantization(None) is None and parse_quantization("none") is None
    assert parse_quantization("int8") == QuantScheme(8)
    assert parse_quantization("int4") == QuantScheme(4, 32)
    assert parse_quantization("INT4-g128", head=True) == QuantScheme(4, 128, True)
    for bad in ("int3", "int4-g16", "int4-g", "fp8"):
        with pytest.raises(QuantizationError, match="accepted: none, int8"):
            parse_quantization(bad)
    with pytest.raises(QuantizationError, match="need a quantization"):
        parse_quantization(None, embeddings=True)


@pytest.mark.parametrize("family", ["llada", "dream", "llada_moe"])
@pytest.mark.parametrize(("head", "embeddings"), [(True, False), (False, True), (True, True)])
def test_linear_weights_load_quantized_and_their_bytes_are_predicted(tiny_checkpoints, family, head, embeddings):
    """Every linear weight (experts too) is held quantized, the head and the embedding table as
    asked, nothing else; the bytes held equal what `mosaic plan` predicts from shapes; outputs say
    the weights are quantized. (A tied table: tests/test_quantization.py::test_a_tied_table_*.)"""
    llm = LLM(tiny_checkpoints[family], quantize="int8", quantize_head=head, quantize_embeddings=embeddings)
    w = llm.checkpoint.weights
    held = [w.embed, w.final_norm, w.lm_head]
    for layer, experts in zip(w.layers, w.experts, strict=True):
        held += list(layer.values()) + [t for e in experts for t in e.values()]
    names = quantized_names(llm.spec, llm.spec.quantization)
    assert sum(isinstance(t, QuantizedWeight) for t in held) == len(names) + embeddings
    assert isinstance(w.lm_head, QuantizedWeight) == head and isinstance(w.embed, QuantizedWeight) == embeddings
    assert sum(t.nbytes for t in held) == weight_bytes(llm.spec, torch.float32)
    cfg = GenerationConfig(gen_length=8, steps=4, **({} if family == "dream" else {"block_length": 8}))
    label = llm.spec.quantization.label
    assert llm.generate("Return the", cfg)[0].settings["weights"] == label == llm.info.weights
    assert label == "int8" + {(True, False): " with head", (False, True): " with embeddings"}.get(
        (head, embeddings), " with head and embeddings"
    )


@pytest.mark.parametrize(("head", "embeddings"), [(False, False), (True, False), (False, True), (True, True)])
def test_a_tied_table_is_held_as_each_use_asks_and_counted(tmp_path, head, embeddings):
    """Tied embeddings: the head's quantized copy, the table's int8 rows, or both; the bytes held
    equal the prediction, and mosaic still equals eager bit for bit."""
    from tests.tiny import build_tiny_checkpoint

    build_tiny_checkpoint(tmp_path, "dream", tie_word_embeddings=True)
    llm = LLM(tmp_path, dtype="bf16", quantize="int4", quantize_head=head, quantize_embeddings=embeddings)
    w = llm.checkpoint.weights
    held = {id(t): t for t in [w.embed, w.final_norm, w.lm_head, *(t for x in w.layers for t in x.values())]}
    assert sum(t.nbytes for t in held.values()) == weight_bytes(llm.spec, torch.bfloat16)
    assert (w.lm_head is w.embed) == (not head and not embeddings)
    ids = torch.randint(0, 300, (1, 21), generator=torch.Generator().manual_seed(0))
    assert torch.equal(joined(llm.executor.row_logits(ids, torch.arange(21))), EagerExecutor(llm.spec, w).logits(ids))


@pytest.mark.parametrize(
    ("family", "scheme"), [("llada", "int4"), ("dream", "int8"), ("llada_moe", "int8"), ("dream", "int4-g64")]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_quantized_models_keep_mosaic_equal_to_eager_chunked_and_packed(tiny_checkpoints, family, scheme, dtype):
    """The quantized kernels' exact calls come from the device profile (probed like a GEMM's), so
    the planned executor's logits are eager's bits, chunked or packed with other requests."""
    from mosaic_dllm.models.groups import Chunks

    llm = LLM(tiny_checkpoints[family], dtype=dtype, quantize=scheme, quantize_head=True, row_chunk=4)
    chunked = LLM(
        tiny_checkpoints[family],
        dtype=dtype,
        quantize=scheme,
        row_chunk=4,
        quantize_head=True,
        chunks=Chunks(norms=2, rotary=3, ffn=5, projections=3),
    )
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 300, (2, 37), generator=g)
    full = EagerExecutor(llm.spec, llm.checkpoint.weights).logits(ids)
    assert torch.equal(joined(llm.executor.row_logits(ids, torch.arange(37))), full)
    assert torch.equal(joined(chunked.executor.row_logits(ids, torch.arange(37))), full)
    other = (torch.randint(0, 300, (1, 11), generator=g), torch.arange(3, 11))
    with llm.executor.batch_logits([other, (ids, torch.arange(20, 37))]) as reads:
        packed = [joined(read()) for read in reads]
    assert torch.equal(packed[1], full[:, 20:])


@pytest.mark.parametrize("family", ["llada", "llada_moe"])
def test_what_quantized_kernels_allocate_stays_within_the_plans_workspace(tiny_checkpoints, family):
    llm = LLM(tiny_checkpoints[family], dtype=torch.bfloat16, quantize="int8", quantize_head=True, row_chunk=8)
    cfg = GenerationConfig(gen_length=40, steps=1, temperature=0.5)
    plan = llm.check_memory(3, cfg)
    with LiveTensorTracker() as tracker:
        llm.generate([5, 6, 7], cfg)
    step = max(r.live_bytes for r in tracker.timeline.records)
    assert step <= plan.workspace_bytes + 64 * 1024  # the step's O(L) bookkeeping


def test_a_group_that_does_not_divide_a_width_is_refused_before_loading(tiny_checkpoints, capsys):
    with pytest.raises(QuantizationError, match=r"int4-g32 needs .* widths \[48\]: use int8"):
        LLM(tiny_checkpoints["llada_moe"], quantize="int4")  # its shared expert is 48 wide
    assert main(["generate", "--model", str(tiny_checkpoints["llada_moe"]), "--prompt", "x", "--quantize", "int4"]) == 2
    assert "widths [48]" in capsys.readouterr().err


def test_mosaic_plan_counts_quantized_weights():
    """llada-8b (2 layers) in 5 GiB: int4 weights leave more to activations, so longer contexts fit."""
    lengths, weights = {}, {}
    for name in ("none", "int4-g128"):
        args = ["plan", "--preset", "llada-8b", "--layers", "2", "--max-len", "--device-memory", "5GiB"]
        record = _json_of(args + ["--quantize", name, "--json"])
        lengths[name], weights[name] = record["executors"]["mosaic"]["max_len"], record["weight_bytes"]
    assert weights["none"] > weights["int4-g128"]
    assert lengths["none"] < lengths["int4-g128"]


def _json_of(argv: list[str]) -> dict:
    import contextlib
    import io
    import json

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return json.loads(out.getvalue())


def test_an_int8_block_cache_holds_each_position_and_head_within_half_a_step():
    """Stored as codes with absmax / 127 per position and head, read back through its scratch: a
    value is within half a step of the stored one (then rounded to the compute dtype)."""
    from mosaic_dllm.models.kv_cache import STORE_CHUNK, BlockCache
    from tests.tiny import tiny_spec

    spec = tiny_spec("llada", ids={"mask": 1, "eos": 2})
    positions = STORE_CHUNK * 2 + 5
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(positions, 4, 16, generator=g).to(torch.bfloat16) for _ in range(2))
    cache = BlockCache(spec, positions, int8=True)
    cache.store(1, k, v)
    codes, scales, scratch = 2 * 2 * positions * 4 * 16, 2 * 2 * positions * 4 * 4, STORE_CHUNK * 4 * 16 * 4
    assert cache.nbytes(torch.bfloat16) == codes + scales + scratch
    held = [*cache.keys, *cache.values, *(s for pair in cache.scales for s in pair), cache.scratch]
    assert sum(t.nbytes for t in held) == codes + scales + scratch  # what is counted is what is held
    llada_8b = preset("llada-8b")  # 128-wide heads: 1 byte + 4 / 128 per element, vs 2
    assert BlockCache(llada_8b, 4096, int8=True).nbytes(torch.bfloat16) < 0.52 * BlockCache(llada_8b, 4096).nbytes(
        torch.bfloat16
    )
    fresh = torch.zeros(3, 4, 16, dtype=torch.bfloat16)
    out = (torch.empty_like(k), torch.empty_like(v))
    cache.splice(1, fresh, fresh, 70, positions, out)
    for stored, got in zip((k, v), out, strict=True):
        half_step = stored.float().abs().amax(-1, keepdim=True) / 127 / 2
        err = (got.float() - stored.float()).abs()
        bound = half_step * 1.01 + got.float().abs() / 256  # plus one bf16 rounding
        assert torch.all(err[:70] <= bound[:70]) and torch.all(err[73:] <= bound[73:])
        assert torch.equal(got[70:73], fresh)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_an_int8_block_cache_is_planned_smaller_and_runs_the_same_on_both_executors(tiny_checkpoints, family):
    cfg = GenerationConfig(gen_length=32, steps=32, block_length=8, cache="dual", threshold=0.5, cache_dtype="int8")
    llm = LLM(tiny_checkpoints[family], dtype=torch.bfloat16)
    full = llm.request([5, 6, 7], replace_cfg(cfg, cache_dtype="model")).worst.cache_bytes
    assert llm.request([5, 6, 7], cfg).worst.cache_bytes != full  # the plan counts the int8 cache
    out = llm.generate([5, 6, 7], cfg)[0]
    assert out.settings["cache_dtype"] == "int8"
    eager = LLM(tiny_checkpoints[family], dtype=torch.bfloat16, executor="eager").generate([5, 6, 7], cfg)[0]
    assert out.token_ids == eager.token_ids
    with LiveTensorTracker() as tracker:  # nothing of the int8 cache's escapes the plan
        plan = llm.check_memory(3, cfg)
        llm.generate([5, 6, 7], cfg)
    assert max(r.live_bytes for r in tracker.timeline.records) <= plan.workspace_bytes + full + 64 * 1024


def test_auto_cache_precision_is_int8_only_when_the_models_does_not_fit(tiny_checkpoints):
    path = tiny_checkpoints["llada"]
    cfg = GenerationConfig(gen_length=64, steps=64, block_length=8, cache="dual", cache_dtype="auto")
    llm = LLM(path, dtype=torch.float32, chunk_groups=())
    sizes = {}
    for dtype in ("model", "int8"):
        sizes[dtype] = llm.executor.plan_for(llm.request([5, 6, 7], replace_cfg(cfg, cache_dtype=dtype)).worst)
    assert llm.generate([5, 6, 7], cfg)[0].settings["cache_dtype"] == "model"
    between = (sizes["model"].predicted_peak_bytes + sizes["int8"].predicted_peak_bytes) // 2
    tight = LLM(path, dtype=torch.float32, chunk_groups=(), memory_budget=between)
    assert tight.generate([5, 6, 7], cfg)[0].settings["cache_dtype"] == "int8"
    with pytest.raises(Exception, match="budget"):
        tight.generate([5, 6, 7], replace_cfg(cfg, cache_dtype="model"))
    with pytest.raises(Exception, match="cache_dtype int8 needs a block cache"):
        llm.generate([5, 6, 7], GenerationConfig(gen_length=8, steps=8, block_length=8, cache_dtype="int8"))


def replace_cfg(cfg: GenerationConfig, **changes) -> GenerationConfig:
    return GenerationConfig(**(cfg.given() | changes))


RSS_CHILD = """
import json, sys
import torch
from mosaic_dllm import LLM
from mosaic_dllm.models.quantized import weight_bytes
def rss():
    return int(next(x for x in open("/proc/self/status") if x.startswith("VmRSS:")).split()[1]) * 1024
before = rss()
llm = LLM(sys.argv[1], quantize=None if sys.argv[2] == "none" else sys.argv[2], dtype="fp32")
print(json.dumps({"held": rss() - before, "predicted": weight_bytes(llm.spec, torch.float32)}))
"""


@pytest.mark.slow
def test_quantized_weights_held_are_the_bytes_plans_count_measured_by_rss(tmp_path):
    """A 4-layer 512-wide model (~70 MB in fp32): the resident memory a quantized load saves is what
    `mosaic plan` counts it saves (the engine's own ~10 MiB cancels out), within 10% + 2 MiB; the
    file's mapping is let go."""
    import json
    import os
    import subprocess
    import sys

    from tests.tiny import build_tiny_checkpoint

    build_tiny_checkpoint(
        tmp_path, "llada", num_layers=4, hidden_size=512, head_dim=128, rotary_dim=128, intermediate_size=2048
    )
    held = {}
    for scheme in ("none", "int8", "int4"):
        env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(1 << 17)}  # large tensors mapped alone, unmapped when freed
        args = [sys.executable, "-c", RSS_CHILD, str(tmp_path), scheme]
        out = subprocess.run(args, capture_output=True, text=True, env=env)
        held[scheme] = json.loads(out.stdout.strip().splitlines()[-1])
        assert held[scheme]["held"] >= held[scheme]["predicted"]
    for scheme in ("int8", "int4"):
        saved = held["none"]["held"] - held[scheme]["held"]
        predicted = held["none"]["predicted"] - held[scheme]["predicted"]
        assert abs(saved - predicted) <= 0.1 * predicted + (2 << 20)
    assert held["int4"]["predicted"] < held["int8"]["predicted"] < 0.3 * held["none"]["predicted"]
