"""Tiny GGUF files as llama.cpp's converter writes LLaDA, Dream and LLaDA-MoE (restated from its
layout: tensor and metadata names, LLaDA's q/k row permutation, F32 norms and biases, stacked
experts), written with the `gguf` package from a tiny checkpoint directory. The `gguf` package
quantizes F16, BF16, Q8_0 and Q4_0 itself; Q4_K and Q6_K blocks are encoded here from the formats'
definitions (and checked against the package's own dequantizer)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import save_file
from safetensors.torch import load_file

from mosaic_dllm.checkpoint import read_spec, shard_files
from mosaic_dllm.models import weight_names

ARCH = {"llada": "llada", "dream": "dream", "llada_moe": "llada-moe"}
# Official role -> llama.cpp's name within block i: restated here from the converter's tensor map
# rather than imported from mosaic_dllm.gguf_file, so that a wrong name there fails the tests.
GGUF_NAMES = {
    "attn_norm": "attn_norm.weight",
    "q": "attn_q.weight",
    "k": "attn_k.weight",
    "v": "attn_v.weight",
    "o": "attn_output.weight",
    "q_bias": "attn_q.bias",
    "k_bias": "attn_k.bias",
    "v_bias": "attn_v.bias",
    "q_norm": "attn_q_norm.weight",
    "k_norm": "attn_k_norm.weight",
    "ffn_norm": "ffn_norm.weight",
    "gate": "ffn_gate.weight",
    "up": "ffn_up.weight",
    "down": "ffn_down.weight",
    "router": "ffn_gate_inp.weight",
}
EXPERTS = {"gate": "ffn_gate_exps.weight", "up": "ffn_up_exps.weight", "down": "ffn_down_exps.weight"}


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """The converter's LLaDA q/k permutation into llama.cpp's interleaved rotary layout."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(x: np.ndarray, kind: Q) -> np.ndarray:
    if kind == Q.F32:
        return x.astype(np.float32)
    if kind == Q.F16:
        return x.astype(np.float16)
    if kind == Q.Q4_K:
        return q4_k(x)
    if kind == Q.Q6_K:
        return q6_k(x)
    if kind == Q.Q8_1:  # a type the `gguf` package cannot dequantize: zero blocks of its size
        block, size = gguf.GGML_QUANT_SIZES[kind]
        return np.zeros((x.shape[0], x.shape[1] // block * size), np.uint8)
    return gguf.quants.quantize(x.astype(np.float32), kind)


def q4_k(x: np.ndarray) -> np.ndarray:
    """Q4_K: per 256 columns f16 d, f16 dmin, 12 bytes of 6-bit sub-block scales and mins, 128 bytes
    of 4-bit codes; a value is d * scale * q - dmin * min, one scale and min per 32 columns."""
    rows = x.shape[0]
    sub = x.astype(np.float32).reshape(rows, -1, 8, 32)
    low = np.minimum(sub.min(-1), 0)
    step = (sub.max(-1) - low) / 15
    d = (step.max(-1) / 63).astype(np.float16).astype(np.float32)
    dmin = (-low.min(-1) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(step / np.where(d > 0, d, 1)[..., None]), 1, 63).astype(np.int32)
    m = np.clip(np.round(-low / np.where(dmin > 0, dmin, 1)[..., None]), 0, 63).astype(np.int32)
    scale, offset = d[..., None] * sc, dmin[..., None] * m
    q = np.clip(np.round((sub + offset[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
    packed = np.zeros((*sc.shape[:2], 12), np.uint8)
    packed[..., 0:4] = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    packed[..., 4:8] = (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6)
    packed[..., 8:12] = (sc[..., 4:] & 0x0F) | ((m[..., 4:] & 0x0F) << 4)
    q = q.reshape(rows, -1, 4, 2, 32)  # chunks of 64 columns: the first 32 low nibbles, the next 32 high
    codes = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(rows, -1, 128)
    halves = [
        d.astype(np.float16).view(np.uint8).reshape(rows, -1, 2),
        dmin.astype(np.float16).view(np.uint8).reshape(rows, -1, 2),
    ]
    return np.concatenate(halves + [packed, codes], axis=-1).reshape(rows, -1)


def q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K: per 256 columns 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales (one per
    16 columns) and f16 d; a value is d * scale * (q - 32)."""
    rows = x.shape[0]
    sub = x.astype(np.float32).reshape(rows, -1, 16, 16)
    amax = np.abs(sub).max(-1)
    d = (amax.max(-1) / (31 * 127)).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(amax / 31 / np.where(d > 0, d, 1)[..., None]), 1, 127).astype(np.int8)
    q = np.clip(np.round(sub / (d[..., None, None] * np.maximum(sc, 1)[..., None])) + 32, 0, 63).astype(np.uint8)
    q = q.reshape(rows, -1, 2, 4, 32)  # halves of 128 columns, four runs of 32 in each
    ql = np.concatenate(
        (q[:, :, :, 0] & 15 | (q[:, :, :, 2] & 15) << 4, q[:, :, :, 1] & 15 | (q[:, :, :, 3] & 15) << 4), axis=-1
    )
    qh = (q[:, :, :, 0] >> 4) | (q[:, :, :, 1] >> 4) << 2 | (q[:, :, :, 2] >> 4) << 4 | (q[:, :, :, 3] >> 4) << 6
    d16 = d.astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
    parts = [ql.reshape(rows, -1, 128), qh.reshape(rows, -1, 64), sc.view(np.uint8).reshape(rows, -1, 16), d16]
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def write_gguf(
    checkpoint: Path,
    out: Path,
    kind: Q = Q.F16,
    kinds: dict[str, Q] | None = None,
    pre: str = "gpt2",
    block_count: int | None = None,
) -> Path:
    """The checkpoint as a GGUF file: linear weights and embeddings stored as `kind` (or as
    `kinds[gguf tensor name]`), norms and biases as F32; `block_count` overrides the metadata's."""
    checkpoint = Path(checkpoint)
    spec = read_spec(checkpoint).spec
    state: dict[str, np.ndarray] = {}
    for file in shard_files(checkpoint):
        state |= {k: v.float().numpy() for k, v in load_file(str(file)).items()}
    arch = ARCH[spec.family]
    w = gguf.GGUFWriter(str(out), arch)
    add_metadata(w, arch, spec, block_count or spec.num_layers)
    add_tokenizer(w, checkpoint, pre)
    names = weight_names(spec)
    tensors = {"token_embd.weight": state[names.embed], "output_norm.weight": state[names.final_norm]}
    if not spec.tie_word_embeddings:
        tensors["output.weight"] = state[names.lm_head]
    for i in range(spec.num_layers):
        for role, name in names.layer.items():
            if name.format(i=i) in state and role in GGUF_NAMES:
                t = state[name.format(i=i)]
                if spec.family == "llada" and role in ("q", "k", "q_bias", "k_bias"):
                    t = permute(t, spec.num_heads if role.startswith("q") else spec.num_kv_heads)
                tensors[f"blk.{i}.{GGUF_NAMES[role]}"] = t
        if spec.is_moe_layer(i):
            for part, name in names.expert.items():
                stack = [state[name.format(i=i, e=e)] for e in range(spec.moe.num_experts)]
                tensors[f"blk.{i}.{EXPERTS[part]}"] = np.stack(stack)
    for name, t in tensors.items():
        chosen = (kinds or {}).get(name, kind) if t.ndim >= 2 else Q.F32
        data = encode(t.reshape(-1, t.shape[-1]), chosen)
        data = data.reshape(*t.shape[:-1], data.shape[-1])
        w.add_tensor(name, data, raw_dtype=chosen if chosen not in (Q.F32, Q.F16) else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def rounded_checkpoint(checkpoint: Path, out: Path, kind: Q = Q.F16, kinds: dict[str, Q] | None = None) -> Path:
    """A safetensors checkpoint (float32) of the weights `write_gguf` stores, as the `gguf` package
    dequantizes them: the reference a GGUF run is compared with. Blocks quantize each row on its
    own, so LLaDA's row permutation does not change the values."""
    checkpoint, out = Path(checkpoint), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = read_spec(checkpoint).spec
    names = weight_names(spec)
    stored = {names.embed: "token_embd.weight", names.lm_head: "output.weight"}
    for i in range(spec.num_layers):
        stored |= {n.format(i=i): f"blk.{i}.{GGUF_NAMES[r]}" for r, n in names.layer.items() if r in GGUF_NAMES}
        if spec.is_moe_layer(i):
            stored |= {
                n.format(i=i, e=e): f"blk.{i}.{EXPERTS[p]}"
                for p, n in names.expert.items()
                for e in range(spec.moe.num_experts)
            }
    state = {}
    for file in shard_files(checkpoint):
        state |= {k: v.float().numpy() for k, v in load_file(str(file)).items()}
    for name, t in state.items():
        if t.ndim >= 2:
            chosen = (kinds or {}).get(stored[name], kind)
            data = encode(t, chosen)
            state[name] = (gguf.quants.dequantize(data, chosen) if chosen not in (Q.F32, Q.F16) else data).astype(
                np.float32
            )
    for f in checkpoint.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            (out / f.name).write_bytes(f.read_bytes())
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def add_metadata(w: gguf.GGUFWriter, arch: str, spec, blocks: int) -> None:
    w.add_uint32(f"{arch}.block_count", blocks)
    w.add_uint32(f"{arch}.context_length", spec.max_position_embeddings)
    w.add_uint32(f"{arch}.embedding_length", spec.hidden_size)
    w.add_uint32(f"{arch}.feed_forward_length", spec.intermediate_size)
    w.add_uint32(f"{arch}.attention.head_count", spec.num_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", spec.num_kv_heads)
    w.add_float32(f"{arch}.rope.freq_base", spec.rope_theta)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", spec.rms_norm_eps)
    w.add_bool(f"{arch}.attention.causal", False)
    if arch == "llada":
        w.add_uint32("llada.vocab_size", spec.vocab_size)
        w.add_uint32("llada.rope.dimension_count", spec.head_dim)
    if arch != "dream":
        w.add_bool("diffusion.shift_logits", False)
    if spec.moe is not None:
        w.add_uint32(f"{arch}.expert_count", spec.moe.num_experts)
        w.add_uint32(f"{arch}.expert_used_count", spec.moe.experts_per_token)
        w.add_uint32(f"{arch}.expert_feed_forward_length", spec.moe.expert_intermediate_size)
    w.add_uint32("tokenizer.ggml.mask_token_id", spec.mask_token_id)
    w.add_uint32("tokenizer.ggml.eos_token_id", spec.eos_token_ids[0])
    if spec.pad_token_id is not None:
        w.add_uint32("tokenizer.ggml.padding_token_id", spec.pad_token_id)


def add_tokenizer(w: gguf.GGUFWriter, checkpoint: Path, pre: str) -> None:
    tok = json.loads((checkpoint / "tokenizer.json").read_text())
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    vocab = tok["model"]["vocab"] | {a["content"]: a["id"] for a in tok["added_tokens"]}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tok["added_tokens"] if a["special"]}
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", pre)
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", [3 if t in special else 1 for t in tokens])
    w.add_array("tokenizer.ggml.merges", [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    if config.get("bos_token"):
        w.add_uint32("tokenizer.ggml.bos_token_id", vocab[config["bos_token"]])
    if config.get("chat_template"):
        w.add_string("tokenizer.chat_template", config["chat_template"])
