"""Weight-only int8 / int4: kernels against restated dequantized references within stated
tolerances; quantized models keep every exactness contract of the engine (mosaic equals eager bit
for bit, chunked or packed); plans count what the quantized kernels allocate; clear errors."""

import pytest
import torch
import torch.nn.functional as F

from mosaic_dllm import LLM, GenerationConfig
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


@pytest.mark.parametrize("family", ["llada", "dream", "llada_moe"])
def test_linear_weights_load_quantized_and_their_bytes_are_predicted(tiny_checkpoints, family):
    """Every linear weight (experts too) is held quantized, nothing else is; the bytes held equal
    what `mosaic plan` predicts from shapes; outputs say the weights are quantized."""
    llm = LLM(tiny_checkpoints[family], quantize="int8", quantize_head=True)
    w = llm.checkpoint.weights
    held = [w.embed, w.final_norm, w.lm_head]
    for layer, experts in zip(w.layers, w.experts, strict=True):
        held += list(layer.values()) + [t for e in experts for t in e.values()]
    names = quantized_names(llm.spec, llm.spec.quantization)
    assert sum(isinstance(t, QuantizedWeight) for t in held) == len(names) + llm.spec.tie_word_embeddings
    assert isinstance(w.lm_head, QuantizedWeight) and not isinstance(w.embed, QuantizedWeight)
    assert sum(t.nbytes for t in held) == weight_bytes(llm.spec, torch.float32)
    cfg = GenerationConfig(gen_length=8, steps=4, **({} if family == "dream" else {"block_length": 8}))
    assert llm.generate("Return the", cfg)[0].settings["weights"] == "int8 with head"
    assert llm.info.weights == "int8 with head"


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
