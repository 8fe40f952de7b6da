"""GGUF files as llama.cpp writes them: float files run bit for bit as their safetensors source;
quantized ones as the `gguf` package's dequantization of the same file (kept-int4 blocks within a
stated tolerance); bad files get one clear error."""

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants
from safetensors.torch import load_file, save_file

from mosaic_dllm import LLM, GenerationConfig
from mosaic_dllm.cli import main
from mosaic_dllm.gguf_file import GGUFError, int4_blocks
from mosaic_dllm.models.quantized import QuantizedWeight
from mosaic_dllm.models.spec import MoESpec
from mosaic_dllm.runtime import EagerExecutor
from tests.tiny import build_tiny_checkpoint
from tests.tiny_gguf import q4_k, rounded_checkpoint, write_gguf

WIDE = dict(hidden_size=256, head_dim=64, rotary_dim=64, intermediate_size=512, std=0.2)  # Q4_K rows: 256 columns


def logits(llm: LLM, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 300, (1, 33), generator=torch.Generator().manual_seed(seed))
    return EagerExecutor(llm.spec, llm.checkpoint.weights).logits(ids)


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    """LLaDA-MoE as the converter can write it: every layer MoE, no shared expert, no expert bias."""
    path = tmp_path_factory.mktemp("moe_gguf")
    moe = MoESpec(4, 2, 32, 0, False, False, (True, True))
    build_tiny_checkpoint(path, "llada_moe", moe=moe)
    return path


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_K"])
def test_int4_blocks_decode_as_the_gguf_package_dequantizes(kind):
    x = np.random.default_rng(0).standard_normal((6, 512)).astype(np.float32)
    data = q4_k(x) if kind == "Q4_K" else quants.quantize(x, Q.Q4_0)
    q, scale, zero = int4_blocks(data, kind)
    ours = ((q.view(6, -1, 32).float() - 8) * scale[..., None] + zero[..., None]).view(6, 512)
    want = torch.from_numpy(quants.dequantize(data, Q[kind]))
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("family", ["llada", "dream", "llada_moe"])
def test_float_files_run_bit_for_bit_as_their_safetensors_source(tmp_path, tiny_checkpoints, moe_checkpoint, family):
    """F32 as fp32 and F16 as fp16: LLaDA's q/k rows unpermuted, Dream's biases, stacked experts;
    the tokenizer from the metadata encodes as the source's; tokens equal."""
    source = moe_checkpoint if family == "llada_moe" else tiny_checkpoints[family]
    for kind, dtype in ((Q.F32, "fp32"), (Q.F16, "fp16")):
        file = write_gguf(source, tmp_path / f"{family}.{kind.name}.gguf", kind)
        a, b = LLM(source, dtype=dtype), LLM(file, dtype=dtype)  # fp16: both the source rounded to f16
        assert torch.equal(logits(a), logits(b))
        text = "Return the number of items <|endoftext|> in the container."
        assert b.tokenizer.encode(text) == a.tokenizer.encode(text)
        assert b.tokenizer.chat_template == a.tokenizer.chat_template
        assert b.spec.mask_token_id == a.spec.mask_token_id and b.spec.eos_token_ids == a.spec.eos_token_ids
        cfg = GenerationConfig(gen_length=8, steps=4, **({} if family == "dream" else {"block_length": 8}))
        assert b.generate("Return the", cfg)[0].token_ids == a.generate("Return the", cfg)[0].token_ids
        assert b.checkpoint.gguf.kept_int4 == 0 and b.spec.quantization is None


def test_quantized_files_run_as_their_dequantized_weights(tmp_path):
    """Q8_0 and Q6_K are dequantized by the `gguf` package: bit for bit with a checkpoint of those
    weights. Q4_0 and Q4_K linear weights stay int4 (fp32 kernels: 1e-5 of the largest logit)."""
    source = tmp_path / "wide"
    build_tiny_checkpoint(source, "llada", **WIDE)
    for kind, kinds in (
        (Q.Q8_0, None),
        (Q.Q6_K, {"output.weight": Q.Q8_0}),
        (Q.Q4_0, None),
        (Q.Q4_K, {"token_embd.weight": Q.Q6_K}),
    ):
        file = write_gguf(source, tmp_path / f"{kind.name}.gguf", kind, kinds)
        reference = LLM(rounded_checkpoint(source, tmp_path / f"{kind.name}.ref", kind, kinds), dtype="fp32")
        llm = LLM(file, dtype="fp32")
        got, want = logits(llm), logits(reference)
        if kind in (Q.Q4_0, Q.Q4_K):
            assert llm.checkpoint.gguf.kept_int4 == 15 and llm.info.weights == "int4-g32 with head"  # 14 + the head
            assert isinstance(llm.checkpoint.weights.layers[0]["q"], QuantizedWeight)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
            assert torch.equal(joined_logits(llm), got)  # the planned executor keeps eager's bits
        else:
            assert torch.equal(got, want)
            assert llm.checkpoint.gguf.dequantized == ({kind.name: 16} if kinds is None else {"Q6_K": 15, "Q8_0": 1})


def joined_logits(llm: LLM) -> torch.Tensor:
    ids = torch.randint(0, 300, (1, 33), generator=torch.Generator().manual_seed(0))
    return torch.cat([x.clone() for _, x in llm.executor.row_logits(ids, torch.arange(33))], dim=1)


def test_a_dequantized_file_can_be_quantized_again_and_info_reports_it(tmp_path, tiny_checkpoints, capsys):
    file = write_gguf(tiny_checkpoints["dream"], tmp_path / "dream.gguf", Q.Q8_0)
    llm = LLM(file, quantize="int8")
    assert isinstance(llm.checkpoint.weights.layers[1]["down"], QuantizedWeight) and llm.info.weights == "int8"
    assert main(["info", str(file), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["stored_dtypes"] == {"Q8_0": 16, "F32": 11}  # 2 x 7 linears, embedding, head; norms, biases
    assert info["gguf"]["dequantized_tensors"] == {"Q8_0": 16} and info["gguf"]["kept_int4_tensors"] == 0


def test_bad_files_get_one_clear_error(tmp_path, tiny_checkpoints, capsys):
    good = write_gguf(tiny_checkpoints["llada"], tmp_path / "good.gguf", Q.F16)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        LLM(truncated)
    other = tmp_path / "llama.gguf"
    other.write_bytes(data.replace(b"llada", b"llama"))  # the architecture's name and its key prefixes
    with pytest.raises(GGUFError, match="architecture 'llama' is not a supported diffusion model"):
        LLM(other)
    fewer = tmp_path / "fewer.gguf"
    write_gguf(tiny_checkpoints["llada"], fewer, Q.F16, block_count=3)
    with pytest.raises(GGUFError, match=r"missing \(\d+\): model.transformer.blocks.2"):
        LLM(fewer)
    unreadable = tmp_path / "q8_1.gguf"
    write_gguf(tiny_checkpoints["llada"], unreadable, Q.F16, kinds={"blk.0.attn_v.weight": Q.Q8_1})
    with pytest.raises(GGUFError, match="blk.0.attn_v.weight is stored as Q8_1, which cannot be read"):
        LLM(unreadable)
    damaged = tmp_path / "damaged"
    build_tiny_checkpoint(damaged, "llada")
    state = load_file(str(damaged / "model.safetensors"))
    state["model.transformer.blocks.1.ff_out.weight"][3, 5] = float("nan")
    save_file(state, str(damaged / "model.safetensors"))
    for kind in (Q.F32, Q.Q4_0):
        with np.errstate(invalid="ignore"):  # the gguf package casts the NaN block's codes
            file = write_gguf(damaged, tmp_path / f"nan.{kind.name}.gguf", kind)
        with pytest.raises(GGUFError, match=r"tensor blk.1.ffn_down.weight holds NaN or infinite values"):
            LLM(file)
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\x00" * 64)
    assert main(["generate", "--model", str(not_gguf), "--prompt", "x"]) == 2
    assert "is a file but not a GGUF file" in capsys.readouterr().err


def test_plans_count_a_gguf_files_weights_as_they_load(tmp_path, capsys):
    """A mixed file (Q4_K layers, one Q6_K, a Q8_0 head): `mosaic plan --model FILE.gguf` counts
    the bytes the loaded weights hold (int4 where kept, the rest in the compute dtype)."""
    source = tmp_path / "wide"
    build_tiny_checkpoint(source, "llada", **WIDE)
    kinds = {"token_embd.weight": Q.Q6_K, "output.weight": Q.Q8_0, "blk.0.ffn_down.weight": Q.Q6_K}
    file = write_gguf(source, tmp_path / "mixed.gguf", Q.Q4_K, kinds)
    for quantize in ("none", "int8"):
        llm = LLM(file, dtype="bf16", quantize=None if quantize == "none" else quantize)
        w = llm.checkpoint.weights
        held = sum(t.nbytes for t in [w.embed, w.final_norm, w.lm_head, *(t for x in w.layers for t in x.values())])
        argv = ["plan", "--model", str(file), "--max-len", "--budget", "2MiB", "--dtype", "bf16"]
        assert main([*argv, "--quantize", quantize, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["weight_bytes"] == held
