"""GGUF files as llama.cpp's converter writes LLaDA, Dream and LLaDA-MoE, read with the `gguf` package.

The metadata becomes the family's Hugging Face config (then parsed and checked like any
config.json), the tensor names the official parameter names, the tokenizer the one the metadata
holds. The converter permutes LLaDA's q and k rows into llama.cpp's interleaved-rotary layout; the
rows are put back as they are read. Tensors whose blocks map onto our int4 layout (Q4_0 and Q4_K:
4-bit codes with one scale and offset per 32 columns) stay quantized; every other type is
dequantized by the `gguf` package to the compute dtype (then quantized with `--quantize`, if
given). What was kept and what was dequantized is reported (`GGUFReport`).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .models import ArchSpec, ConfigError, SpecialIds, parse_config, weight_names
from .models.quantized import INT4_BLOCKS, from_int4, quantize, quantize_table, quantized_names, weight_bytes
from .models.spec import QuantScheme
from .models.weights import Weights, all_finite, check_state_dict, from_state_dict
from .tokenizer import Tokenizer, TokenizerError

log = logging.getLogger(__name__)

MAGIC = b"GGUF"
FAMILY_OF_ARCH = {"llada": "llada", "dream": "dream", "llada-moe": "llada_moe"}
# Official role -> GGUF tensor name within block i (llama.cpp's tensor map for these architectures).
LAYER_TENSORS = {
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
EXPERT_TENSORS = {"gate": "ffn_gate_exps.weight", "up": "ffn_up_exps.weight", "down": "ffn_down_exps.weight"}
# Pre-tokenizer splits by llama.cpp's `tokenizer.ggml.pre` name (GPT-2's is the byte-level default).
GPT2_PRE = ("default", "gpt2", "gpt-2")
SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
KEPT = ("Q4_0", "Q4_K")  # block types whose codes, scales and offsets are our int4 groups of 32


class GGUFError(ValueError):
    """A GGUF file that cannot be read as one of our families, with what is wrong."""


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


@dataclass
class GGUFReport:
    """What loading did with each stored type: kept as int4, or dequantized to the compute dtype."""

    architecture: str
    file_type: int | None
    stored: dict[str, int] = field(default_factory=dict)  # tensors per stored type
    kept_int4: int = 0
    dequantized: dict[str, int] = field(default_factory=dict)
    pre_tokenizer: str = ""

    def describe(self) -> str:
        stored = ", ".join(f"{n} {t}" for t, n in sorted(self.stored.items()))
        done = [f"{self.kept_int4} kept as int4 (Q4_0 / Q4_K blocks)"] if self.kept_int4 else []
        done += [f"{n} {t} dequantized" for t, n in sorted(self.dequantized.items())]
        return f"GGUF {self.architecture}: tensors {stored}" + (f"; {', '.join(done)}" if done else "")


class GGUFFile:
    """An opened GGUF file: its metadata as a family config, its tensors under official names."""

    def __init__(self, path: Path):
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path))
            self.fields = {k: f.contents() for k, f in self.reader.fields.items()}
        except Exception as exc:  # truncated, a bad magic or version, an unknown tensor type
            raise GGUFError(f"{path} is not a readable GGUF file: {exc}") from exc
        self.tensors = {t.name: t for t in self.reader.tensors}
        arch = self.fields.get("general.architecture")
        if arch not in FAMILY_OF_ARCH:
            raise GGUFError(
                f"{path}: GGUF architecture {arch!r} is not a supported diffusion model "
                f"(supported: {', '.join(FAMILY_OF_ARCH)})"
            )
        self.arch, self.family = arch, FAMILY_OF_ARCH[arch]

    def value(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        full = key if key.startswith(("general.", "tokenizer.")) else f"{self.arch}.{key}"
        if full not in self.fields:
            if required:
                raise GGUFError(f"{self.path}: GGUF metadata has no {full!r}")
            return default
        return self.fields[full]

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in torch order (GGUF lists dimensions innermost first)."""
        return tuple(int(n) for n in reversed(self.tensors[name].shape))

    # -- the description --------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The family's Hugging Face config, from the metadata and which tensors exist."""
        if "token_embd.weight" not in self.tensors:
            raise GGUFError(f"{self.path}: no token_embd.weight tensor")
        vocab = self.shape("token_embd.weight")[0]
        hidden = int(self.value("embedding_length", required=True))
        heads = int(self.value("attention.head_count", required=True))
        common = {
            "vocab_size": vocab,
            "rope_theta": float(self.value("rope.freq_base", 10000.0)),
            "rms_norm_eps": float(self.value("attention.layer_norm_rms_epsilon", 1e-5)),
        }
        layers = int(self.value("block_count", required=True))
        kv_heads = int(self.value("attention.head_count_kv", heads))
        tied = "output.weight" not in self.tensors
        bias = "blk.0.attn_q.bias" in self.tensors
        context = int(self.value("context_length", 4096))
        if self.family == "llada":
            return common | {
                "architectures": ["LLaDAModelLM"],
                "d_model": hidden,
                "n_layers": layers,
                "n_heads": heads,
                "n_kv_heads": kv_heads,
                "mlp_hidden_size": int(self.value("feed_forward_length", required=True)),
                "max_sequence_length": context,
                "weight_tying": tied,
                "include_qkv_bias": bias,
            }
        hf = common | {
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "max_position_embeddings": context,
            "tie_word_embeddings": tied,
        }
        if self.family == "dream":
            return hf | {"architectures": ["DreamModel"], "intermediate_size": int(self.value("feed_forward_length"))}
        rotary = self.value("rope.dimension_count")
        return hf | {  # the converter writes every layer as MoE, no shared expert, no expert bias
            "architectures": ["LLaDAMoEModelLM"],
            "num_experts": int(self.value("expert_count", required=True)),
            "num_experts_per_tok": int(self.value("expert_used_count", required=True)),
            "expert_intermediate_size": int(self.value("expert_feed_forward_length", required=True)),
            "moe_layer_freq": [1] * layers,
            "qk_layernorm": "blk.0.attn_q_norm.weight" in self.tensors,
            "attention_bias": bias,
            "partial_rotary_factor": int(rotary) / (hidden // heads) if rotary else 1.0,
        }

    def special_ids(self) -> SpecialIds:
        def token(key: str) -> int | None:
            value = self.value(f"tokenizer.ggml.{key}")
            return None if value is None else int(value)

        eos = token("eos_token_id")
        return SpecialIds(token("mask_token_id"), (eos,) if eos is not None else (), token("padding_token_id"))

    def spec(self) -> ArchSpec:
        """The family's spec; quantized as loading holds it when Q4_0 / Q4_K linear weights stay int4."""
        try:
            spec = parse_config(self.config(), self.special_ids())
        except ConfigError as exc:
            raise GGUFError(f"{self.path}: {exc}") from exc
        kept = self._kept_int4(spec)
        if not kept:
            return spec
        return replace(spec, quantization=QuantScheme(4, 32, head=weight_names(spec).lm_head in kept))

    def _kept_int4(self, spec: ArchSpec) -> set[str]:
        """Official names of the linear weights whose stored blocks load as int4 (Q4_0, Q4_K)."""
        quantizable = quantized_names(spec, QuantScheme(4, 32, True))
        mapping = self.official_names(spec)
        return {n for n in quantizable if n in mapping and self.tensors[mapping[n][0]].tensor_type.name in KEPT}

    def loaded_bytes(self, spec: ArchSpec, dtype: torch.dtype, quantization: QuantScheme | None = None) -> int:
        """The bytes the weights take once loaded in `dtype` (int4 where kept, the rest quantized by
        `quantization` where it applies), from the headers alone."""
        return weight_bytes(replace(spec, quantization=quantization), dtype, self._kept_int4(spec))

    def tokenizer(self) -> tuple[Tokenizer | None, str]:
        """The tokenizer the metadata holds (None without one), and its pre-tokenizer's name."""
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        kind = self.value("tokenizer.ggml.model")
        if kind is None:
            return None, ""
        if kind != "gpt2":
            raise GGUFError(
                f"{self.path}: tokenizer model {kind!r} is not supported (LLaDA, Dream and LLaDA-MoE use gpt2)"
            )
        tokens = list(self.value("tokenizer.ggml.tokens", required=True))
        types = list(self.value("tokenizer.ggml.token_type", [1] * len(tokens)))
        merges = [tuple(m.split(" ", 1)) for m in self.value("tokenizer.ggml.merges", [])]
        try:
            tok = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
        except Exception as exc:
            raise GGUFError(f"{self.path}: the tokenizer's tokens and merges do not form a BPE: {exc}") from exc
        pre = str(self.value("tokenizer.ggml.pre", "default"))
        if pre in SPLITS:
            split = pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated")
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
            )
        else:
            if pre not in GPT2_PRE:
                log.warning("%s: pre-tokenizer %r is not known here: text is split as GPT-2's", self.path, pre)
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(
            [AddedToken(t, special=True) for t, k in zip(tokens, types, strict=False) if k == CONTROL]
        )
        tok.add_tokens([AddedToken(t, special=False) for t, k in zip(tokens, types, strict=False) if k == USER_DEFINED])
        ids = self.special_ids()
        text = {
            "eos_token": tokens[ids.eos_token_ids[0]] if ids.eos_token_ids else None,
            "pad_token": tokens[ids.pad_token_id] if ids.pad_token_id is not None else None,
            "bos_token": tokens[b] if (b := self.value("tokenizer.ggml.bos_token_id")) is not None else None,
            "chat_template": self.value("tokenizer.chat_template"),
        }
        try:
            return Tokenizer(tok, {k: v for k, v in text.items() if v is not None}), pre
        except (IndexError, TokenizerError) as exc:
            raise GGUFError(f"{self.path}: the tokenizer metadata is inconsistent: {exc}") from exc

    def summary(self, spec: ArchSpec) -> dict[str, Any]:
        """`mosaic info`: what the file holds and what loading would keep or dequantize (no data read)."""
        mapping = self.official_names(spec)
        kept = {mapping[n][0] for n in self._kept_int4(spec)}
        floats = ("F32", "F16", "BF16")
        dequantized = Counter(
            t.tensor_type.name for n, t in self.tensors.items() if n not in kept and t.tensor_type.name not in floats
        )
        return {
            "architecture": self.arch,
            "file_type": self.value("general.file_type"),
            "pre_tokenizer": self.value("tokenizer.ggml.pre"),
            "kept_int4_tensors": len(kept),
            "dequantized_tensors": dict(dequantized),
        }

    # -- the tensors -----------------------------------------------------------------------
    def official_names(self, spec: ArchSpec) -> dict[str, tuple[str, int | None]]:
        """Official name -> (GGUF tensor, expert index within a stacked tensor, or None)."""
        names = weight_names(spec)
        out = {names.embed: ("token_embd.weight", None), names.final_norm: ("output_norm.weight", None)}
        if not spec.tie_word_embeddings:
            out[names.lm_head] = ("output.weight", None)
        for i in range(spec.num_layers):
            for role, name in names.layer.items():
                if role in LAYER_TENSORS and f"blk.{i}.{LAYER_TENSORS[role]}" in self.tensors:
                    out[name.format(i=i)] = (f"blk.{i}.{LAYER_TENSORS[role]}", None)
            if spec.is_moe_layer(i):
                for part, name in names.expert.items():
                    for e in range(spec.moe.num_experts):
                        out[name.format(i=i, e=e)] = (f"blk.{i}.{EXPERT_TENSORS[part]}", e)
        return out

    def check(self, spec: ArchSpec) -> dict[str, tuple[str, int | None]]:
        """Every tensor the spec needs is there with its shape, and nothing else is (one error)."""
        mapping = self.official_names(spec)
        shapes = {}
        for official, (stored, expert) in mapping.items():
            if stored in self.tensors:
                shape = self.shape(stored)
                shapes[official] = shape[1:] if expert is not None else shape
        used = {stored for stored, _ in mapping.values()}
        shapes |= {f"(GGUF) {n}": self.shape(n) for n in self.tensors if n not in used}
        try:
            check_state_dict(spec, shapes)
        except ConfigError as exc:
            raise GGUFError(f"{self.path}: {exc}") from exc
        return mapping

    def load(
        self, spec: ArchSpec, dtype: torch.dtype | None, device: torch.device, quantization: QuantScheme | None
    ) -> tuple[ArchSpec, Weights, GGUFReport]:
        """The weights, tensor by tensor (never the whole model twice): Q4_0 / Q4_K linear weights
        kept as int4, the rest dequantized to `dtype` (default bf16, fp32 for an all-F32 file), then
        quantized by `quantization` where it applies."""
        import gguf

        mapping = self.check(spec)
        kept = self._kept_int4(spec)
        requantized = quantized_names(spec, quantization) if quantization else set()
        types = Counter(t.tensor_type.name for t in self.tensors.values())
        dtype = dtype or (torch.float32 if set(types) == {"F32"} else torch.bfloat16)
        report = GGUFReport(self.arch, self.value("general.file_type"), dict(types))
        permuted = self._permuted_heads(spec)
        state: dict[str, Any] = {}
        for official, (stored, expert) in mapping.items():
            t = self.tensors[stored]
            data = t.data if expert is None else t.data[expert]  # a view of the mapped file
            if official in permuted:
                data = unpermute(data, permuted[official])
            kind = t.tensor_type
            if official in kept:
                q, scale, zero = int4_blocks(data, kind.name)
                self._check_finite(stored, scale, zero)
                state[official] = from_int4(INT4_BLOCKS, q, scale, zero, dtype, device)
                report.kept_int4 += 1
                continue
            try:
                values = gguf.quants.dequantize(data, kind) if kind.name not in ("F32", "F16") else data
            except NotImplementedError:
                raise GGUFError(
                    f"{self.path}: tensor {stored} is stored as {kind.name}, which cannot be read"
                ) from None
            if kind.name not in ("F32", "F16", "BF16"):
                report.dequantized[kind.name] = report.dequantized.get(kind.name, 0) + 1
            tensor = torch.from_numpy(np.array(values, copy=True))
            self._check_finite(stored, tensor)
            tensor = tensor.to(device=device, dtype=dtype)
            if official in requantized:
                tensor = quantize(tensor, quantization)
            state[official] = tensor
        weights = from_state_dict(spec, state)
        if quantization is not None:  # the user's scheme (kept blocks stay int4), else the file's own (`spec`)
            spec = replace(spec, quantization=quantization)
            quantize_table(weights, quantization)
        return spec, weights, report

    def _check_finite(self, stored: str, *values: torch.Tensor) -> None:
        if not all(all_finite(v) for v in values):
            raise GGUFError(f"{self.path}: tensor {stored} holds NaN or infinite values: the file is damaged")

    def _permuted_heads(self, spec: ArchSpec) -> dict[str, int]:
        """LLaDA's q and k (weights and biases) by official name -> the heads the converter permuted by."""
        if self.family != "llada":
            return {}
        names, out = weight_names(spec), {}
        for role, heads in (("q", spec.num_heads), ("k", spec.num_kv_heads)):
            for key in (role, f"{role}_bias"):
                if key in names.layer:
                    out |= {names.layer[key].format(i=i): heads for i in range(spec.num_layers)}
        return out


def unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Rows in the official order again: the converter grouped each head's rows as (half, 2) pairs
    for llama.cpp's interleaved rotary; grouping them as (2, half) undoes it (block rows move whole)."""
    n = rows.shape[0]
    return rows.reshape(heads, n // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def int4_blocks(data: np.ndarray, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_K rows of blocks -> (N, K) codes in [0, 15] and per-32-column (N, K / 32) scale and
    zero with W = (q - 8) * scale + zero, in float32 (the blocks' own values, exactly)."""
    rows = data.shape[0]
    if kind == "Q4_0":  # 18 bytes per 32 columns: f16 d, then 16 bytes: column j low nibble, j + 16 high
        blocks = data.reshape(rows, -1, 18)
        d = blocks[..., :2].copy().view(np.float16).astype(np.float32)[..., 0]
        qs = blocks[..., 2:]
        q = np.concatenate((qs & 0x0F, qs >> 4), axis=-1).reshape(rows, -1)
        return _codes(q), torch.from_numpy(d), torch.zeros(d.shape)
    # Q4_K: 144 bytes per 256 columns: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 of codes
    blocks = data.reshape(rows, -1, 144)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
    packed = blocks[..., 4:16].astype(np.int32)
    scales = np.empty((*packed.shape[:2], 8), np.int32)
    mins = np.empty_like(scales)
    scales[..., :4], mins[..., :4] = packed[..., 0:4] & 63, packed[..., 4:8] & 63
    scales[..., 4:] = (packed[..., 8:12] & 0x0F) | ((packed[..., 0:4] >> 6) << 4)
    mins[..., 4:] = (packed[..., 8:12] >> 4) | ((packed[..., 4:8] >> 6) << 4)
    qs = blocks[..., 16:].reshape(rows, -1, 4, 32)  # four chunks of 64 columns: low nibbles, then high
    q = np.stack((qs & 0x0F, qs >> 4), axis=3).reshape(rows, -1)
    scale = d * scales.astype(np.float32)  # (rows, superblocks, 8): one per 32 columns
    zero = 8 * scale - dmin * mins.astype(np.float32)
    return _codes(q), torch.from_numpy(scale.reshape(rows, -1)), torch.from_numpy(zero.reshape(rows, -1))


def _codes(q: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(q.astype(np.int32))
