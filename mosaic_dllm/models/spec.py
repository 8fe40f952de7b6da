"""The architecture of one checkpoint, normalised from its family's config.json.

Every family (LLaDA, Dream, LLaDA-MoE; SDAR and LLaDA2.x block-causal) is a pre-norm transformer; they differ in
config keys, parameter names and a handful of numerical quirks. `ArchSpec` holds the sizes and the
quirks; `WeightNames` holds the official parameter names. The maths lives once, in `transformer.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A checkpoint's config.json cannot describe a supported model."""


@dataclass(frozen=True)
class MoESpec:
    """A sparse FFN's routing. "softmax" (LLaDA-MoE, Qwen3-MoE): softmax of the router's logits,
    plus the expert bias, top-k, optionally renormalised. "sigmoid" (LLaDA2.x, BailingMoeV2): the
    router in float32, sigmoid scores, the expert bias for choosing only, the top k among the
    experts of the best `top_groups` of `groups` groups (a group scores its two best), the chosen
    scores renormalised and scaled by `scaling`, the experts' outputs summed in float32."""

    num_experts: int
    experts_per_token: int
    expert_intermediate_size: int
    shared_expert_intermediate_size: int  # 0: no shared expert
    expert_bias: bool  # the router has a per-expert bias (see the class docstring for its use)
    normalize_top_k: bool
    moe_layers: tuple[bool, ...]  # per layer: MoE (True) or dense FFN (False)
    score: str = "softmax"  # "softmax" | "sigmoid"
    groups: int = 1
    top_groups: int = 1
    scaling: float = 1.0


@dataclass(frozen=True)
class QuantScheme:
    """How a model's linear weights are held, when not in the compute dtype: `bits` 8 (one scale
    per output channel, symmetric) or 4 (a scale and a zero point per `group` input columns);
    `head`: the LM head too; `embeddings`: the embedding table too, as int8 with one scale per
    token row. Norms, biases and MoE routers stay in the compute dtype."""

    bits: int
    group: int = 0  # 4 bits: input columns per scale; 0 for 8 bits (per output channel)
    head: bool = False
    embeddings: bool = False

    @property
    def name(self) -> str:
        return "int8" if self.bits == 8 else f"int4-g{self.group}"

    @property
    def label(self) -> str:
        """What outputs say of weights quantized so."""
        parts = [p for p, on in (("head", self.head), ("embeddings", self.embeddings)) if on]
        return self.name + (f" with {' and '.join(parts)}" if parts else "")


@dataclass(frozen=True)
class ArchSpec:
    family: str  # "llada" | "dream" | "llada_moe" | "sdar" | "llada2"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense FFN width (used by layers that are not MoE)
    vocab_size: int  # rows of the embedding and of the LM head
    rope_theta: float
    rotary_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    mask_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None = None
    qkv_bias: bool = False
    output_bias: bool = False  # the attention's output projection has a bias (LLaDA2.x's use_bias)
    qk_norm: bool = False  # per-head RMSNorm on q and k (LLaDA-MoE)
    # LLaDA rotates q and k in float32 and casts back; Dream / LLaDA-MoE cast the tables to the
    # hidden dtype and rotate in that dtype. Both are exact reproductions of the official code.
    rope_full_precision: bool = False
    logit_shift: bool = False  # Dream: hidden state at p-1 gives the logits of position p
    float_logits: bool = False  # LLaDA2.x: the official forward returns every logit in float32
    tie_word_embeddings: bool = False
    moe: MoESpec | None = None
    # Block diffusion (SDAR, LLaDA2.x): the config's block size, what decoding takes unless told otherwise
    # (attention is block-causal over the decoding's blocks); 0: a full-canvas family.
    block_size: int = 0
    torch_dtype: str | None = None  # dtype named by the config, if any
    quantization: QuantScheme | None = None  # weights as loaded (`quantized.py`); None: the compute dtype

    def __post_init__(self) -> None:
        positive = {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
        }
        bad = [f"{k}={v}" for k, v in positive.items() if not isinstance(v, int) or v <= 0]
        if bad:
            raise ConfigError(f"{self.family} config: these sizes must be positive integers: {', '.join(bad)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{self.family} config: {self.num_heads} attention heads are not a multiple of "
                f"{self.num_kv_heads} key/value heads"
            )
        if not 0 < self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise ConfigError(f"{self.family} config: rotary dim {self.rotary_dim} must be even and <= head dim")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ConfigError(
                f"{self.family} config: mask token id {self.mask_token_id} is outside the vocabulary "
                f"(size {self.vocab_size})"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and self.moe.moe_layers[layer]


@dataclass(frozen=True)
class WeightNames:
    """Official parameter names; `{i}` is the layer index, `{e}` the expert index. `fused`: a file
    tensor that holds several roles' rows one after another (LLaDA2.x's query_key_value) -> those
    roles in order; their names in `layer` are then the engine's own, split from it at load."""

    embed: str
    final_norm: str
    lm_head: str
    layer: dict[str, str] = field(default_factory=dict)
    expert: dict[str, str] = field(default_factory=dict)
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
