"""The parameters a spec needs, under their official names, checked against what a checkpoint holds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import weight_names
from .spec import ArchSpec, ConfigError


class WeightMismatchError(ConfigError):
    """The checkpoint's tensors do not match what its config.json describes."""


@dataclass
class Weights:
    embed: torch.Tensor
    final_norm: torch.Tensor
    lm_head: torch.Tensor
    layers: list[dict[str, torch.Tensor]]
    experts: list[list[dict[str, torch.Tensor]]]  # per layer, per expert (empty for dense layers)

    def tensors(self) -> list[torch.Tensor]:
        out = [self.embed, self.final_norm, self.lm_head]
        for layer, experts in zip(self.layers, self.experts, strict=False):
            out += layer.values()
            for expert in experts:
                out += expert.values()
        return out


def expected_shapes(spec: ArchSpec) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape, for every tensor the model reads (optional ones excluded), as the
    engine holds them: official names, a fused tensor's parts under their own (`file_shapes`:
    as the checkpoint's files hold them)."""
    names = weight_names(spec)
    h, q, kv = spec.hidden_size, spec.q_size, spec.kv_size
    shapes = {names.embed: (spec.vocab_size, h), names.final_norm: (h,), names.lm_head: (spec.vocab_size, h)}
    for i in range(spec.num_layers):
        role = {"attn_norm": (h,), "q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "ffn_norm": (h,)}
        if spec.qkv_bias:
            role |= {"q_bias": (q,), "k_bias": (kv,), "v_bias": (kv,)}
        if spec.output_bias:
            role["o_bias"] = (h,)
        if spec.qk_norm:
            role |= {"q_norm": (spec.head_dim,), "k_norm": (spec.head_dim,)}
        if spec.is_moe_layer(i):
            moe = spec.moe
            role["router"] = (moe.num_experts, h)
            if moe.shared_expert_intermediate_size:
                s = moe.shared_expert_intermediate_size
                role |= {"shared_gate": (s, h), "shared_up": (s, h), "shared_down": (h, s)}
            e_i = moe.expert_intermediate_size
            for e in range(moe.num_experts):
                for part, shape in (("gate", (e_i, h)), ("up", (e_i, h)), ("down", (h, e_i))):
                    shapes[names.expert[part].format(i=i, e=e)] = shape
        else:
            f = spec.intermediate_size
            role |= {"gate": (f, h), "up": (f, h), "down": (h, f)}
        for r, shape in role.items():
            shapes[names.layer[r].format(i=i)] = shape
    return shapes


def fused_parts(spec: ArchSpec) -> dict[str, list[tuple[str, int, int]]]:
    """Each fused file tensor (`WeightNames.fused`) -> (part name, first row, rows) of its roles."""
    names, out = weight_names(spec), {}
    if not names.fused:  # most families: nothing to look up
        return out
    shapes = expected_shapes(spec)
    for i in range(spec.num_layers):
        for fused, roles in names.fused.items():
            parts, first = [], 0
            for role in roles:
                part = names.layer[role].format(i=i)
                parts.append((part, first, shapes[part][0]))
                first += shapes[part][0]
            out[fused.format(i=i)] = parts
    return out


def file_shapes(spec: ArchSpec) -> dict[str, tuple[int, ...]]:
    """`expected_shapes` as the checkpoint's files hold them: each fused tensor whole."""
    shapes = expected_shapes(spec)
    for fused, parts in fused_parts(spec).items():
        tail = shapes[parts[0][0]][1:]
        for part, _, _ in parts:
            del shapes[part]
        shapes[fused] = (sum(rows for _, _, rows in parts), *tail)
    return shapes


def unfused(spec: ArchSpec, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with each fused tensor replaced by its parts (views of its rows)."""
    parts = fused_parts(spec)
    if not parts.keys() & state.keys():
        return state
    out = {name: t for name, t in state.items() if name not in parts}
    for fused, pieces in parts.items():
        if fused in state:
            out |= {part: state[fused][first : first + rows] for part, first, rows in pieces}
    return out


def optional_names(spec: ArchSpec) -> dict[str, tuple[int, ...]]:
    """Tensors a checkpoint may hold or omit (LLaDA-MoE's router expert bias is a zero buffer by default)."""
    if spec.moe is None or not spec.moe.expert_bias:
        return {}
    names = weight_names(spec)
    return {
        names.layer["expert_bias"].format(i=i): (spec.moe.num_experts,)
        for i in range(spec.num_layers)
        if spec.is_moe_layer(i)
    }


def check_state_dict(spec: ArchSpec, shapes: dict[str, tuple[int, ...]], split: bool = False) -> None:
    """Raise one error listing every missing, unexpected and mis-shaped tensor of `shapes`: a
    file's (fused tensors whole), or with `split` the engine's (fused tensors as their parts)."""
    expected = expected_shapes(spec) if split else file_shapes(spec)
    optional = optional_names(spec)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected) - set(optional))
    wrong = sorted(
        f"{n}: checkpoint {tuple(shapes[n])}, config expects {s}"
        for n, s in (expected | optional).items()
        if n in shapes and tuple(shapes[n]) != s
    )
    if missing or unexpected or wrong:
        lines = [f"checkpoint tensors do not match its {spec.family} config.json:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + "; ".join(shown))
        raise WeightMismatchError("\n".join(lines))


FINITE_CHECK_ELEMENTS = 1 << 24  # a bounded temporary per check, whatever the tensor's size


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a weight holds no NaN or infinity (checked a bounded slice at a time)."""
    if not tensor.is_floating_point():
        return True
    flat = tensor.reshape(-1)
    return all(
        bool(torch.isfinite(flat[start : start + FINITE_CHECK_ELEMENTS]).all())
        for start in range(0, flat.numel(), FINITE_CHECK_ELEMENTS)
    )


# Linear weights by role in `WeightNames.layer` (experts' are all linear); routers stay whole.
LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down", "shared_gate", "shared_up", "shared_down")
# What a tensor-parallel rank holds 1/N of, by output rows: every linear weight and the biases of
# the projections that have them (routers, norms and embeddings stay whole).
ROW_SHARDED_ROLES = (*LINEAR_ROLES, "q_bias", "k_bias", "v_bias", "o_bias")


def linear_names(spec: ArchSpec, head: bool, roles: tuple[str, ...] = LINEAR_ROLES) -> set[str]:
    """The official names of every linear layer's weight (`roles` of each layer), the experts'
    too, and with `head` an untied LM head (a tied one is the embedding table)."""
    names = weight_names(spec)
    out = {names.layer[r].format(i=i) for i in range(spec.num_layers) for r in roles if r in names.layer}
    for i in range(spec.num_layers):
        if spec.is_moe_layer(i):
            out |= {n.format(i=i, e=e) for n in names.expert.values() for e in range(spec.moe.num_experts)}
    if head and not spec.tie_word_embeddings:
        out.add(names.lm_head)
    return out & set(expected_shapes(spec))


def row_sharded_names(spec: ArchSpec) -> set[str]:
    """The tensors a tensor-parallel rank reads only its rows of (`checkpoint.load(rank_rows=...)`)."""
    return linear_names(spec, head=True, roles=ROW_SHARDED_ROLES)


def from_state_dict(spec: ArchSpec, state: dict[str, torch.Tensor], checked: bool = False) -> Weights:
    """The weights of `state` (official names), checked against the spec unless the caller already
    checked the file they came from (a tensor-parallel rank's rows are not the full shapes)."""
    state, names = unfused(spec, state), weight_names(spec)
    if not checked:
        check_state_dict(spec, {k: tuple(v.shape) for k, v in state.items()}, split=True)
    layers, experts = [], []
    for i in range(spec.num_layers):
        layer = {r: state[n.format(i=i)] for r, n in names.layer.items() if n.format(i=i) in state}
        if spec.is_moe_layer(i) and spec.moe.expert_bias and "expert_bias" not in layer:
            layer["expert_bias"] = torch.zeros(spec.moe.num_experts, device=layer["router"].device)
        layers.append(layer)
        experts.append(
            [{p: state[n.format(i=i, e=e)] for p, n in names.expert.items()} for e in range(spec.moe.num_experts)]
            if spec.is_moe_layer(i)
            else []
        )
    return Weights(state[names.embed], state[names.final_norm], state[names.lm_head], layers, experts)


def random_state_dict(
    spec: ArchSpec, dtype: torch.dtype, seed: int = 0, std: float = 0.02, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Random parameters under the official names (fused tensors whole): norms at 1, everything
    else N(0, std)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    state = {}
    for name, shape in {**file_shapes(spec), **optional_names(spec)}.items():
        if name.endswith("norm.weight") or "layernorm" in name or name.endswith("ln_f.weight"):
            t = torch.ones(shape)
        elif name.endswith("expert_bias"):
            t = torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=gen) * std
        state[name] = t.to(device=device, dtype=dtype)
    return state
