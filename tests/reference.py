"""Independent restatements of the official code, for tests only.

Written from the official modeling files and samplers (docs/reference.md), reading
config.json keys and official parameter names directly, and using the global RNG as the official
code does. Nothing here imports the engine's model or decoding code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributions as dists
import torch.nn.functional as F
from safetensors.torch import load_file


def load_state(path: Path, dtype: torch.dtype) -> tuple[dict, dict]:
    config = json.loads((path / "config.json").read_text())
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state |= {k: v.to(dtype) for k, v in load_file(str(f)).items()}
    return config, state


def _rms(x, w, eps):
    og = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * x.to(og)


def _rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _with_cache(i, k, v, past, replace_position, presents):
    """Fast-dLLM's modeling_llada attention cache: the layer's K and V before rotary, the past ones
    concatenated in front (prefix) or overwritten at `replace_position` (dual); returns the keys'
    and values' full length and the first position of the queries."""
    t = k.shape[-2]
    first = 0
    if past is not None:
        pk, pv = past[i]
        if replace_position is None:
            k, v = torch.cat((pk, k), dim=-2), torch.cat((pv, v), dim=-2)
            first = k.shape[-2] - t
        else:
            where = replace_position.nonzero(as_tuple=True)[1]
            pk[:, :, where] = k
            pv[:, :, where] = v
            k, v = pk, pv
            first = int(where.max()) + 1 - t
    if presents is not None:
        presents.append((k, v))
    return k, v, first


def llada_logits(config: dict, sd: dict, ids: torch.Tensor, past=None, replace_position=None, presents=None):
    """modeling_llada.py (LLaDALlamaBlock, rope_full_precision, SDPA without mask); with `past` and
    `presents`, Fast-dLLM's cached forward (its modeling_llada.py)."""
    b, t = ids.shape
    nh, nkv = config["n_heads"], config["n_kv_heads"]
    hs = config["d_model"] // nh
    eps = config["rms_norm_eps"]
    x = F.embedding(ids, sd["model.transformer.wte.weight"])
    inv = 1.0 / (config["rope_theta"] ** (torch.arange(0, hs, 2, dtype=torch.float) / hs))

    def tables(n):
        freqs = torch.einsum("i , j -> i j", torch.arange(n, dtype=torch.float), inv)
        pos = torch.cat((freqs, freqs), dim=-1)
        return pos.sin()[None, None], pos.cos()[None, None]

    def rot_half(v):
        bb, hh, tt, dd = v.size()
        x1, x2 = v.view(bb, hh, tt, 2, dd // 2).unbind(dim=-2)
        return torch.cat((-x2, x1), dim=-1)

    def rope(v, sin, cos):
        vf = v.float()
        return ((vf * cos) + (rot_half(vf) * sin)).to(vf.dtype).type_as(v)

    for i in range(config["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        h = _rms(x, sd[p + "attn_norm.weight"], eps)
        q = F.linear(h, sd[p + "q_proj.weight"]).view(b, t, nh, hs).transpose(1, 2)
        k = F.linear(h, sd[p + "k_proj.weight"]).view(b, t, nkv, hs).transpose(1, 2)
        v = F.linear(h, sd[p + "v_proj.weight"]).view(b, t, nkv, hs).transpose(1, 2)
        k, v, first = _with_cache(i, k, v, past, replace_position, presents)
        sin, cos = tables(k.shape[-2])
        q = rope(q, sin[:, :, first : first + t], cos[:, :, first : first + t])
        k = rope(k, sin, cos)
        if nkv != nh:
            k = k.repeat_interleave(nh // nkv, dim=1, output_size=nh)
            v = v.repeat_interleave(nh // nkv, dim=1, output_size=nh)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
        x = x + F.linear(att.transpose(1, 2).contiguous().view(b, t, nh * hs), sd[p + "attn_out.weight"])
        og = x
        h = _rms(x, sd[p + "ff_norm.weight"], eps)
        a, up = F.linear(h, sd[p + "ff_proj.weight"]), F.linear(h, sd[p + "up_proj.weight"])
        x = og + F.linear(F.silu(a) * up, sd[p + "ff_out.weight"])
    x = _rms(x, sd["model.transformer.ln_f.weight"], eps)
    return F.linear(x, sd["model.transformer.ff_out.weight"])


def _hf_rope(config, t, dtype, head_dim):
    dim = int(head_dim * config.get("partial_rotary_factor", 1.0))
    inv = 1.0 / (config["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    pos = torch.arange(t)[None]
    freqs = (inv[None, :, None].float() @ pos[:, None, :].float()).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _mlp(x, sd, p):
    return F.linear(
        F.silu(F.linear(x, sd[p + "gate_proj.weight"])) * F.linear(x, sd[p + "up_proj.weight"]),
        sd[p + "down_proj.weight"],
    )


def hf_logits(config: dict, sd: dict, ids: torch.Tensor, past=None, replace_position=None, presents=None):
    """modeling_dream.py (Qwen2 + SDPA) and modeling_lladamoe.py (OLMoE-style, qk-norm per head);
    with `past` and `presents`, the cache of Fast-dLLM's modeling_llada applied to them."""
    b, t = ids.shape
    nh = config["num_attention_heads"]
    nkv = config.get("num_key_value_heads") or nh
    hd = config["hidden_size"] // nh
    eps = config["rms_norm_eps"]
    moe = "num_experts" in config
    x = F.embedding(ids, sd["model.embed_tokens.weight"])
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        residual = x
        h = _rms(x, sd[p + "input_layernorm.weight"], eps)
        q = F.linear(h, sd[a + "q_proj.weight"], sd.get(a + "q_proj.bias"))
        k = F.linear(h, sd[a + "k_proj.weight"], sd.get(a + "k_proj.bias"))
        if moe and config.get("qk_layernorm"):
            q = _rms(q.reshape(-1, hd), sd[a + "q_norm.weight"], eps).reshape(b, t, -1)
            k = _rms(k.reshape(-1, hd), sd[a + "k_norm.weight"], eps).reshape(b, t, -1)
        v = F.linear(h, sd[a + "v_proj.weight"], sd.get(a + "v_proj.bias"))
        q = q.view(b, t, nh, hd).transpose(1, 2)
        k = k.view(b, t, nkv, hd).transpose(1, 2)
        v = v.view(b, t, nkv, hd).transpose(1, 2)
        k, v, first = _with_cache(i, k, v, past, replace_position, presents)
        keys = k.shape[-2]
        cos, sin = _hf_rope(config, keys, x.dtype, hd)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        rd = cos.shape[-1]
        qc, qs = cos[:, :, first : first + t], sin[:, :, first : first + t]
        q = torch.cat(((q[..., :rd] * qc) + (_rotate_half(q[..., :rd]) * qs), q[..., rd:]), dim=-1)
        k = torch.cat(((k[..., :rd] * cos) + (_rotate_half(k[..., :rd]) * sin), k[..., rd:]), dim=-1)
        rep = nh // nkv
        if rep > 1:
            k = k[:, :, None].expand(b, nkv, rep, keys, hd).reshape(b, nh, keys, hd)
            v = v[:, :, None].expand(b, nkv, rep, keys, hd).reshape(b, nh, keys, hd)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
        x = residual + F.linear(att.transpose(1, 2).contiguous().view(b, t, nh * hd), sd[a + "o_proj.weight"])
        residual = x
        h = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)
        freq = config.get("moe_layer_freq") or [1] * config["num_hidden_layers"]
        if moe and freq[i]:
            flat = h.view(-1, h.shape[-1])
            rw = F.softmax(F.linear(flat, sd[p + "mlp.gate.weight"]), dim=1, dtype=torch.float)
            if p + "mlp.expert_bias" in sd:
                rw += sd[p + "mlp.expert_bias"]
            rw, sel = torch.topk(rw, config["num_experts_per_tok"], dim=-1)
            rw = rw.to(h.dtype)
            out = torch.zeros_like(flat)
            emask = F.one_hot(sel, num_classes=config["num_experts"]).permute(2, 1, 0)
            for e in range(config["num_experts"]):
                idx, top = torch.where(emask[e])
                cur = _mlp(flat[None, top].reshape(-1, flat.shape[-1]), sd, p + f"mlp.experts.{e}.")
                out.index_add_(0, top, (cur * rw[top, idx, None]).to(h.dtype))
            f = out.view(b, t, -1)
            if config.get("shared_expert_intermediate_size"):
                f = f + _mlp(h, sd, p + "shared_expert.")
        else:
            f = _mlp(h, sd, p + "mlp.")
        x = residual + f
    x = _rms(x, sd["model.norm.weight"], eps)
    return F.linear(x, sd["lm_head.weight"])


# ----------------------------------------------------------------------------------------------------
# Official LLaDA generate(), current ML-GSAI/LLaDA (docs/reference.md section 1), global RNG.


def add_gumbel_noise(logits, temperature):
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand_like(logits, dtype=torch.float64)
    gumbel_noise = (-torch.log(noise)) ** temperature
    return logits.exp() / gumbel_noise


def get_num_transfer_tokens(mask_index, steps):
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num[i, : remainder[i]] += 1
    return num


@torch.no_grad()
def llada_generate(
    model,
    prompt,
    steps,
    gen_length,
    block_length,
    temperature,
    cfg_scale,
    remasking,
    mask_id,
    logits_eos_inf=False,
    confidence_eos_eot_inf=False,
    eos_id=None,
    eot_id=None,
):
    """generate.py, with its LLaDA-Instruct options; `eos_id` / `eot_id` stand for its hard-coded
    126081 / 126348."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()
    prompt_index = x != mask_id
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        s = prompt.shape[1] + num_block * block_length
        block_mask_index = x[:, s : s + block_length] == mask_id
        num_transfer_tokens = get_num_transfer_tokens(block_mask_index, steps)
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                logits = model(torch.cat([x, un_x], dim=0))
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x)
            if logits_eos_inf:
                logits[:, :, eos_id] = -torch.inf
            logits_with_noise = add_gumbel_noise(logits, temperature=temperature)
            x0 = torch.argmax(logits_with_noise, dim=-1)
            if confidence_eos_eot_inf:  # the official chained assignment, aliasing at temperature 0 included
                logits_with_noise[:, :, eos_id] = logits[:, :, eot_id] = -torch.inf
            if remasking == "low_confidence":
                p = F.softmax(logits, dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            elif remasking == "random":
                x0_p = torch.rand((x0.shape[0], x0.shape[1]))
            x0_p[:, prompt.shape[1] + (num_block + 1) * block_length :] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=num_transfer_tokens[j, i])
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x


# ----------------------------------------------------------------------------------------------------
# Official Dream diffusion_generate() / _sample (generation_utils.py), global RNG.


def top_p_logits(logits, top_p=None):
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    sorted_indices_to_remove = cumulative_probs > top_p
    sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
    sorted_indices_to_remove[..., 0] = 0
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask = mask.scatter_(-1, sorted_indices, sorted_indices_to_remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def top_k_logits(logits, top_k=None):
    top_k = min(top_k, logits.size(-1))
    indices_to_remove = logits < torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(indices_to_remove, torch.finfo(logits.dtype).min)


def sample_tokens(logits, temperature=0.0, top_p=None, top_k=None, margin_confidence=False, neg_entropy=False):
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        try:
            x0 = dists.Categorical(probs=probs).sample()
            confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
        except Exception:
            confidence, x0 = probs.max(dim=-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin_confidence:
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
    if neg_entropy:
        epsilon = 1e-10
        log_probs = torch.log(probs + epsilon)
        confidence = torch.sum(probs * log_probs, dim=-1)
    return confidence, x0


@torch.no_grad()
def dream_generate(model, input_ids, max_new_tokens, steps, temperature, top_p, top_k, alg, alg_temp, eps, mask_id):
    x = F.pad(input_ids, (0, max_new_tokens), value=mask_id)
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == mask_id
        logits = model(x)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        mask_logits = logits[mask_index]
        t = timesteps[i]
        s = timesteps[i + 1]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index], dtype=torch.long) + mask_id
            transfer_index_t_s = torch.rand(*x0.shape) < p_transfer
            _, x0[transfer_index_t_s] = sample_tokens(
                mask_logits[transfer_index_t_s], temperature=temperature, top_p=top_p, top_k=top_k
            )
            x[mask_index] = x0.clone()
        else:
            if alg == "maskgit_plus":
                confidence, x0 = sample_tokens(mask_logits, temperature=temperature, top_p=top_p, top_k=top_k)
            elif alg == "topk_margin":
                confidence, x0 = sample_tokens(
                    mask_logits, temperature=temperature, top_p=top_p, top_k=top_k, margin_confidence=True
                )
            elif alg == "entropy":
                confidence, x0 = sample_tokens(mask_logits, temperature, top_p=top_p, top_k=top_k, neg_entropy=True)
            num_mask_token = mask_index.sum() / mask_index.shape[0]
            number_transfer_tokens = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
            full_confidence = torch.full_like(x, -torch.inf, dtype=logits.dtype)
            full_confidence[mask_index] = confidence
            if number_transfer_tokens > 0:
                if alg_temp is None or alg_temp == 0:
                    _, transfer_index = torch.topk(full_confidence, number_transfer_tokens)
                else:
                    full_confidence = full_confidence / alg_temp
                    full_confidence = F.softmax(full_confidence, dim=-1)
                    transfer_index = torch.multinomial(full_confidence, num_samples=number_transfer_tokens)
                x_ = torch.zeros_like(x, dtype=torch.long) + mask_id
                x_[mask_index] = x0.clone()
                row_indices = torch.arange(x.size(0)).unsqueeze(1).expand_as(transfer_index)
                x[row_indices, transfer_index] = x_[row_indices, transfer_index]
    return x


# transformers 4.46 (Dream's pinned version): PretrainedConfig.__init__ gives every model config these
# generation attributes, taking config.json's value where it has one (`_get_global_generation_defaults`).
GLOBAL_GENERATION_DEFAULTS = {
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "num_beams": 1,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "num_return_sequences": 1,
}


def dream_call_settings(model_config: dict, prompt_length: int, **kwargs) -> dict:
    """The settings of Dream's `model.diffusion_generate(input_ids, **kwargs)` with no generation_config
    argument: `_prepare_generation_config` builds `DreamGenerationConfig.from_model_config(model.config)`
    and updates it with the call's kwargs; `_prepare_generated_length` turns max_new_tokens /
    max_length into the canvas length (returned as max_new_tokens)."""
    config = GLOBAL_GENERATION_DEFAULTS | model_config  # the model config's attributes
    config = {k: v for k, v in config.items() if v is not None}  # from_model_config drops None values
    generation = {  # DreamGenerationConfig.__init__ pops these from the config dict
        "temperature": config.pop("temperature", 0.0),
        "top_p": config.pop("top_p", None),
        "top_k": config.pop("top_k", None),
        "max_length": config.pop("max_length", 20),
        "max_new_tokens": config.pop("max_new_tokens", None),
        "eps": config.pop("eps", 1e-3),
        "steps": config.pop("steps", 512),
        "alg": config.pop("alg", "origin"),
        "alg_temp": config.pop("alg_temp", None),
    }
    generation |= {k: v for k, v in kwargs.items() if k in generation}  # GenerationConfig.update
    has_default_max_length = kwargs.get("max_length") is None and generation["max_length"] is not None
    if generation["max_new_tokens"] is not None:
        generation["max_length"] = generation["max_new_tokens"] + prompt_length
    elif has_default_max_length and generation["max_length"] == 20:
        generation["max_length"] = min(
            generation["max_length"] + prompt_length, model_config["max_position_embeddings"]
        )
    generation["max_new_tokens"] = generation.pop("max_length") - prompt_length
    return generation


def dream_diffusion_generate(model, model_config: dict, input_ids, mask_id, **kwargs):
    """Dream's `model.diffusion_generate(input_ids, **kwargs)`: its settings, then `_sample`."""
    g = dream_call_settings(model_config, input_ids.shape[-1], **kwargs)
    return dream_generate(
        model,
        input_ids,
        g["max_new_tokens"],
        g["steps"],
        g["temperature"],
        g["top_p"],
        g["top_k"],
        g["alg"],
        g["alg_temp"],
        g["eps"],
        mask_id,
    )


# ---- LLaDA's Monte Carlo log-likelihood (get_log_likelihood.py / eval_llada.py), restated ------------


def llada_forward_process(batch, prompt_index, mask_id, device_gen=None, cpu_gen=None):
    """eval_llada.py's `_forward_process`: `randint` on the batch's device, `randperm` with no
    device (the CPU); `device_gen` / `cpu_gen` stand for those global generators (None: the CPU one)."""
    b, length = batch.shape
    target_len = (length - prompt_index.sum()).item()
    k = torch.randint(1, target_len + 1, (), generator=device_gen)
    x = torch.round(torch.linspace(float(k), k + (b - 1) * (target_len / b), steps=b)).long()
    x = ((x - 1) % target_len) + 1
    is_mask = torch.arange(target_len).repeat(b, 1) < x.unsqueeze(1)
    for i in range(b):
        is_mask[i] = is_mask[i][torch.randperm(target_len, generator=cpu_gen)]
    is_mask = torch.cat((torch.zeros(b, int(prompt_index.sum()), dtype=torch.bool), is_mask), dim=1)
    return torch.where(is_mask, mask_id, batch), (x / target_len).unsqueeze(1).repeat(1, length)


def llada_log_likelihood(model, prefix, target, mc_num, batch_size, cfg_scale, mask_id):
    """`model(ids) -> (B, L, V) logits`; the global RNG seeded by the caller, as the official script."""
    seq = torch.cat([prefix, target])[None, :].repeat((batch_size, 1))
    prompt_index = torch.arange(seq.shape[1]) < len(prefix)
    acc = []
    for _ in range(mc_num // batch_size):
        perturbed, p_mask = llada_forward_process(seq, prompt_index, mask_id)
        mask_index = perturbed == mask_id
        batch = perturbed
        if cfg_scale > 0.0:
            un = batch.clone()
            un[prompt_index.unsqueeze(0).repeat(batch.shape[0], 1)] = mask_id
            batch = torch.cat([batch, un])
        logits = model(batch)
        if cfg_scale > 0.0:
            cond, un_logits = torch.chunk(logits, 2, dim=0)
            logits = un_logits + (cfg_scale + 1) * (cond - un_logits)
        loss = F.cross_entropy(logits[mask_index], seq[mask_index], reduction="none") / p_mask[mask_index]
        acc.append((loss.sum() / batch_size).item())
    return -sum(acc) / len(acc)


def dream_log_likelihood(model, prefix, target, mc_num, batch_size, log_type, sampling_eps, mask_id):
    """HKUNLP/Dream eval/eval.py `_eval_target_nll_mc` (and `loglikelihood`'s union division),
    restated; `model(ids) -> (B, L, V)` unshifted logits; the global RNG seeded by the caller."""
    seq = torch.cat([prefix, target])[None, :].repeat((batch_size, 1))
    acc = []
    for _ in range(max(mc_num // batch_size, 1)):
        b, length = seq.shape
        u0 = torch.rand(1, dtype=torch.float32)
        t = (u0 + torch.arange(b).float() / b) % 1
        p_mask = ((1 - sampling_eps) * t + sampling_eps)[:, None].repeat(1, length)
        mask_indices = torch.rand((b, length)) < p_mask
        mask_indices[:, 0] = False
        mask_indices[:, -1] = False
        noisy = torch.where(mask_indices, mask_id, seq)
        perturbed = seq.clone()
        if log_type == "ftb":
            perturbed[:, -len(target) :] = noisy[:, -len(target) :]
        elif log_type == "btf":
            perturbed[:, : len(prefix)] = noisy[:, : len(prefix)]
        else:
            perturbed = noisy
        mask_indices = perturbed == mask_id
        logits = model(perturbed)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        loss = F.cross_entropy(logits[mask_indices], seq[mask_indices], reduction="none") / p_mask[mask_indices]
        acc.append((loss.sum() / batch_size).item())
    value = -sum(acc) / len(acc)
    return value / (len(target) + len(prefix)) if log_type == "union" else value


def dream_encode_pair(encode, bos_text, eos_id, context, continuation, add_bos_token, max_length):
    """HKUNLP/Dream eval/eval.py `_encode_pair`, restated (`encode(text) -> ids`)."""
    if add_bos_token:
        context = bos_text + context
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(context + continuation) + [eos_id]
    context_enc = encode(context)
    continuation_enc = whole[len(context_enc) :]
    cutoff = max(len(whole) - max_length, 0)
    if cutoff > 0:
        remain = len(context_enc) - cutoff
        if remain > 0:
            context_enc = context_enc[-remain:]
        else:
            context_enc = []
            continuation_enc = whole[-max_length:]
    return context_enc, continuation_enc


# ----------------------------------------------------------------------------------------------------
# Fast-dLLM's LLaDA decoding (NVlabs/Fast-dLLM v1/llada/generate.py, the current upstream): threshold
# / factor parallel decoding, with a prefix or dual block cache. Global RNG, batch of one.


def fast_transfer(logits, temperature, remasking, mask_index, x, quota, threshold=None):
    """get_transfer_index (quota or threshold), restated: float64 confidences and uniforms, the
    threshold vectorised with the most confident forced, the quota from a descending sort."""
    x0 = torch.argmax(add_gumbel_noise(logits, temperature), dim=-1)
    if remasking == "low_confidence":
        p = F.softmax(logits.to(torch.float64), dim=-1)
        x0_p = torch.gather(p, dim=-1, index=x0.unsqueeze(-1)).squeeze(-1)
    else:
        x0_p = torch.rand(x0.shape, dtype=torch.float64)
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, torch.tensor(torch.finfo(x0_p.dtype).min, dtype=x0_p.dtype))
    if threshold is not None:
        transfer = mask_index & (confidence >= threshold)
        forced = torch.zeros_like(transfer).scatter_(1, torch.argmax(confidence, dim=1, keepdim=True), True)
        return x0, (transfer | forced) & mask_index
    _, order = torch.sort(confidence, dim=1, descending=True)
    first = torch.arange(x0.shape[1]).unsqueeze(0) < quota
    transfer = torch.zeros(x0.shape, dtype=torch.int8).scatter(1, order, first.to(torch.int8))
    return x0, transfer.bool() & mask_index


def fast_transfer_factor(logits, temperature, remasking, mask_index, x, factor):
    """get_transfer_index_dynamic, restated (float32 uniforms, topk)."""
    x0 = torch.argmax(add_gumbel_noise(logits, temperature), dim=-1)
    if remasking == "low_confidence":
        p = F.softmax(logits.to(torch.float64), dim=-1)
        x0_p = torch.gather(p, dim=-1, index=x0.unsqueeze(-1)).squeeze(-1)
    else:
        x0_p = torch.rand((x0.shape[0], x0.shape[1]))
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, -np.inf)
    transfer = torch.zeros_like(x0, dtype=torch.bool)
    masked = int(mask_index[0].sum())
    if masked == 0:
        return x0, transfer
    bounds = [1 - factor / (n + 1) for n in range(1, masked + 1)]
    bounds[0] = -1
    ranked = torch.sort(confidence[0][mask_index[0]], descending=True)[0]
    for top in range(masked):
        if ranked[top] < bounds[top]:
            break
    if top in (0, masked - 1):
        top += 1
    transfer[0, torch.topk(confidence[0], k=top)[1]] = True
    return x0, transfer


@torch.no_grad()
def fast_generate(
    forward,
    prompt,
    steps,
    gen_length,
    block_length,
    temperature,
    remasking,
    mask_id,
    threshold=None,
    factor=None,
    cache=None,
):
    """Fast-dLLM's `generate` (cache None), `generate_with_prefix_cache` ("prefix") and
    `generate_with_dual_cache` ("dual": at most steps / blocks passes a block); `forward(ids, past,
    replace_position, presents)` -> logits. Returns the canvas and the forward passes."""
    x = torch.full((1, prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt
    num_blocks = gen_length // block_length
    per_block = steps // num_blocks
    passes = 0

    def transfer(logits, mask_index, canvas, i):
        if factor is not None:
            return fast_transfer_factor(logits, temperature, remasking, mask_index, canvas, factor)
        q = quota[:, i] if threshold is None else None
        return fast_transfer(logits, temperature, remasking, mask_index, canvas, q, threshold)

    for b in range(num_blocks):
        start = prompt.shape[1] + b * block_length
        end = start + block_length
        quota = get_num_transfer_tokens(x[:, start:end] == mask_id, per_block)
        if cache is None:
            i = 0
            while True:
                passes += 1
                mask_index = x == mask_id
                logits = forward(x, None, None, None)
                mask_index[:, end:] = False
                x0, chosen = transfer(logits, mask_index, x, i)
                x[chosen] = x0[chosen]
                i += 1
                if not (x[:, start:end] == mask_id).any():
                    break
            continue
        presents = []
        logits = forward(x, None, None, presents)
        passes += 1
        mask_index = x == mask_id
        mask_index[:, end:] = False
        x0, chosen = transfer(logits, mask_index, x, 0)
        x = torch.where(chosen, x0, x)
        if cache == "prefix":
            past = [(k[:, :, :start], v[:, :, :start]) for k, v in presents]
            i = 1
            while (x[:, start:end] == mask_id).any():
                passes += 1
                mask_index = x[:, start:] == mask_id
                mask_index[:, block_length:] = False
                logits = forward(x[:, start:], past, None, None)
                add_gumbel_noise(logits, temperature)  # drawn and dropped, as the reference does
                x0, chosen = transfer(logits, mask_index, x[:, start:], i)
                x[:, start:][chosen] = x0[chosen]
                i += 1
            continue
        replace_position = torch.zeros_like(x, dtype=torch.bool)
        replace_position[:, start:end] = True
        for i in range(1, per_block):  # the upstream's fixed loop: masks may remain
            if not (x[:, start:end] == mask_id).any():
                break
            logits = forward(x[:, start:end], presents, replace_position, None)
            mask_index = x[:, start:end] == mask_id
            x0, chosen = transfer(logits, mask_index, x[:, start:end], i)
            x = torch.cat([x[:, :start], torch.where(chosen, x0, x[:, start:end]), x[:, end:]], dim=1)
            passes += 1
    return x, passes


@torch.no_grad()
def fast_dream_threshold_generate(
    model, input_ids, max_new_tokens, steps, temperature, top_p, top_k, threshold, mask_id
):
    """Fast-dLLM's one-canvas Dream sampler (dream/model/generation_utils.py `_sample`, alg
    confidence_threshold), batch of one: n = masked / steps a step plus what the step before
    deferred; the first always, the others at or above the threshold; the last step defers by
    adding a step."""
    x = F.pad(input_ids, (0, max_new_tokens), value=mask_id)
    mask_index = x == mask_id
    assert mask_index.sum() % steps == 0
    number = mask_index.sum().item() // steps
    left = 0
    i = 0
    while i < steps:
        mask_index = x == mask_id
        logits = model(x)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        confidence, x0 = sample_tokens(logits[mask_index], temperature=temperature, top_p=top_p, top_k=top_k)
        proposal = torch.zeros_like(x) + mask_id
        proposal[mask_index] = x0.clone()
        full = torch.full_like(x, -torch.inf, dtype=logits.dtype)
        full[mask_index] = confidence
        count, left = number + left, 0
        chosen_confidence, chosen = torch.topk(full, count)
        transfer = torch.zeros_like(x, dtype=torch.bool)
        transfer[0, chosen[0]] = True
        for k in range(1, count):
            if chosen_confidence[0, k] < threshold:
                if i < steps - 1:
                    left += 1
                else:
                    number, steps, left = 0, steps + 1, left + 1
                transfer[0, chosen[0, k]] = False
        x[transfer] = proposal[transfer].clone()
        i += 1
    return x, steps


@torch.no_grad()
def fast_dream_generate(
    forward, prompt, gen_length, steps, block_length, temperature, top_p, top_k, alg_temp, eps, mask_id, threshold, dual
):
    """Fast-dLLM's Dream block sampler (dream/model/generation_utils_block.py `_sample`), batch of
    one: alg confidence_threshold when `threshold` is given, else its entropy quota; always cached
    (prefix, or dual). `forward(ids, past, replace_position, presents)` -> logits."""
    x = F.pad(prompt, (0, gen_length), value=mask_id)
    num_blocks = gen_length // block_length
    per_block = steps // num_blocks
    timesteps = torch.linspace(1, eps, per_block + 1)

    def shifted(logits):
        return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)

    for b in range(num_blocks):
        start = prompt.shape[1] + b * block_length
        end = start + block_length
        presents = []
        logits = shifted(forward(x, None, None, presents))
        _, x0 = sample_tokens(logits, temperature=temperature, top_p=top_p, top_k=top_k)
        x[:, start] = x0[:, start]
        if dual:
            past = presents
            replace_position = torch.zeros_like(x, dtype=torch.bool)
            replace_position[:, start:end] = True
        else:
            past = [(k[:, :, :start], v[:, :, :start]) for k, v in presents]
        i = 1
        while True:
            stop = end if dual else x.shape[1]
            mask_index = x[:, start:stop] == mask_id
            logits = shifted(forward(x[:, start:stop], past, replace_position if dual else None, None))
            if threshold is not None:
                confidence, x0 = sample_tokens(logits[mask_index], temperature=temperature, top_p=top_p, top_k=top_k)
                proposal = torch.zeros_like(x[:, start:stop]) + mask_id
                full = torch.full_like(x[:, start:stop], -torch.inf, dtype=logits.dtype)
                proposal[mask_index] = x0.clone()
                full[mask_index] = confidence
                full[:, block_length:] = -torch.inf
                count = (x[:, start:end] == mask_id).sum()
                chosen_confidence, chosen = torch.topk(full, count)
                transfer = torch.zeros_like(proposal, dtype=torch.bool)
                transfer[0, chosen[0]] = True
                for k in range(1, count):
                    if chosen_confidence[0, k] < threshold:
                        transfer[0, chosen[0, k]] = False
                x[:, start:stop][transfer] = proposal[transfer]
            else:
                if i == per_block:
                    break
                t, s = timesteps[i], timesteps[i + 1]
                mask_index[:, block_length:] = False
                confidence, x0 = sample_tokens(
                    logits[mask_index], temperature, top_p=top_p, top_k=top_k, neg_entropy=True
                )
                num = mask_index.sum() / mask_index.shape[0]
                n = int(num * (1 - s / t)) if i < per_block - 1 else int(num)
                full = torch.full_like(x[:, start:stop], -torch.inf, dtype=logits.dtype)
                full[mask_index] = confidence
                full[:, block_length:] = -torch.inf
                if n > 0:
                    if alg_temp is None or alg_temp == 0:
                        _, transfer = torch.topk(full, n)
                    else:
                        transfer = torch.multinomial(F.softmax(full / alg_temp, dim=-1), num_samples=n)
                    proposal = torch.zeros_like(x[:, start:stop]) + mask_id
                    proposal[mask_index] = x0.clone()
                    rows = torch.arange(x.size(0)).unsqueeze(1).expand_as(transfer)
                    x[:, start:stop][rows, transfer] = proposal[rows, transfer]
                i += 1
            if (x[:, start:end] == mask_id).sum() == 0:
                break
    return x


# ----------------------------------------------------------------------------------------------------
# SDAR (JetAstra/SDAR at c2041a8): modeling_sdar.py's inference forward (Qwen3 with q/k norms, the
# Triton RMSNorm restated as transformers' Qwen3 RMSNorm) and generate.py's block_diffusion_generate.


def sdar_forward(config: dict, sd: dict, ids, positions, mask, past: list, store_kv: bool):
    """modeling_sdar's forward at inference: `past` a list of per-layer (K, V) (the DynamicCache),
    appended to when `store_kv`, else read in front of the fresh ones; `mask` (1, t, keys) bool:
    all True -> flash_attn_func without a mask (restated as SDPA), else SDPA with it."""
    b, t = ids.shape
    nh = config["num_attention_heads"]
    hd = config.get("head_dim") or config["hidden_size"] // nh
    eps = config["rms_norm_eps"]
    x = F.embedding(ids, sd["model.embed_tokens.weight"])
    inv = 1.0 / (config["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    freqs = (inv[None, :, None].float() @ positions[:, None, :].float()).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype)[:, None], emb.sin().to(x.dtype)[:, None]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        residual = x
        h = _rms(x, sd[p + "input_layernorm.weight"], eps)
        q = _rms(F.linear(h, sd[a + "q_proj.weight"]).view(b, t, -1, hd), sd[a + "q_norm.weight"], eps).transpose(1, 2)
        k = _rms(F.linear(h, sd[a + "k_proj.weight"]).view(b, t, -1, hd), sd[a + "k_norm.weight"], eps).transpose(1, 2)
        v = F.linear(h, sd[a + "v_proj.weight"]).view(b, t, -1, hd).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if store_kv:
            if len(past) > i:
                past[i] = (torch.cat([past[i][0], k], dim=-2), torch.cat([past[i][1], v], dim=-2))
            else:
                past.append((k, v))
            k, v = past[i]
        elif len(past) > i:
            k, v = torch.cat([past[i][0], k], dim=-2), torch.cat([past[i][1], v], dim=-2)
        if bool(mask.all()):
            att = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
        x = residual + F.linear(att.transpose(1, 2).reshape(b, t, nh * hd), sd[a + "o_proj.weight"])
        residual = x
        h = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)
        x = residual + (_qwen3_moe(config, sd, p, h) if p + "mlp.gate.weight" in sd else _mlp(h, sd, p + "mlp."))
    x = _rms(x, sd["model.norm.weight"], eps)
    return F.linear(x, sd["lm_head.weight"])


def _qwen3_moe(config, sd, p, h):
    """transformers' Qwen3MoeSparseMoeBlock (SDAR-MoE's FFN)."""
    b, t, hidden = h.shape
    flat = h.view(-1, hidden)
    weights = F.softmax(F.linear(flat, sd[p + "mlp.gate.weight"]), dim=1, dtype=torch.float)
    weights, chosen = torch.topk(weights, config["num_experts_per_tok"], dim=-1)
    if config.get("norm_topk_prob"):
        weights /= weights.sum(dim=-1, keepdim=True)
    weights = weights.to(h.dtype)
    out = torch.zeros_like(flat)
    mask = F.one_hot(chosen, num_classes=config["num_experts"]).permute(2, 1, 0)
    for e in range(config["num_experts"]):
        idx, top = torch.where(mask[e])
        y = _mlp(flat[None, top].reshape(-1, hidden), sd, p + f"mlp.experts.{e}.") * weights[top, idx, None]
        out.index_add_(0, top, y.to(h.dtype))
    return out.view(b, t, hidden)


def sdar_sample(logits, temperature, top_k, top_p):
    """generate.py's sample_with_temperature_topk_topp (global RNG); temperature 0 -> greedy, the
    one place it is not the published code (which divides by zero)."""
    shape = logits.shape[:-1]
    logits = logits.reshape(-1, logits.shape[-1])
    if temperature not in (0, 1.0):
        logits = logits / temperature
    if top_k > 0:
        values, _ = torch.topk(logits, top_k)
        logits = torch.where(logits < values[..., -1, None], torch.full_like(logits, float("-inf")), logits)
    if top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        drop = torch.scatter(torch.full_like(logits, False, dtype=torch.bool), -1, sorted_indices, remove)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    token = probs.argmax(-1, keepdim=True) if temperature == 0 else torch.multinomial(probs, num_samples=1)
    return token.view(*shape), torch.gather(probs, -1, token).view(*shape), probs


def sdar_generate(
    config,
    sd,
    prompt,
    mask_id,
    gen_length,
    block_length,
    denoising_steps,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    remasking_strategy="low_confidence_dynamic",
    confidence_threshold=0.85,
    eb_threshold=0.35,
    stopping_criteria_idx=None,
    only_masked=True,
):
    """block_diffusion_generate, batch 1, global RNG. `only_masked=False`: the published top-k
    fallback, which may pick revealed positions; True: masked ones only (what it means).
    entropy_bounded: the entropy of each position's sampling distribution (the published branch
    raises); it then runs until the block is done."""
    prompt_length = prompt.shape[1]
    num_blocks = (prompt_length + gen_length + block_length - 1) // block_length
    total = num_blocks * block_length
    block_mask = torch.tril(torch.ones(num_blocks, num_blocks))
    bd_mask = block_mask.repeat_interleave(block_length, 0).repeat_interleave(block_length, 1).bool()[None]
    position_ids = torch.arange(total)[None]
    x = torch.full((1, total), mask_id, dtype=torch.long)
    x[:, :prompt_length] = prompt
    prefill_blocks = prompt_length // block_length
    prefill = prefill_blocks * block_length
    past: list = []
    passes = 0
    if prefill > 0:
        sdar_forward(config, sd, x[:, :prefill], position_ids[:, :prefill], bd_mask[:, :prefill, :prefill], past, True)
        passes += 1
    base, rem = divmod(block_length, denoising_steps)
    quota = [base + (i < rem) for i in range(denoising_steps)]
    for nb in range(prefill_blocks, num_blocks):
        s, e = nb * block_length, (nb + 1) * block_length
        cur_x = x[:, s:e].clone()
        mask = bd_mask[:, s:e, :e]
        step = 0
        while True:
            mask_index = cur_x == mask_id
            if mask_index.sum() == 0:
                sdar_forward(config, sd, cur_x, position_ids[:, s:e], mask, past, True)
                passes += 1
                break
            if step > denoising_steps and remasking_strategy != "entropy_bounded":
                break
            logits = sdar_forward(config, sd, cur_x, position_ids[:, s:e], mask, past, False)
            passes += 1
            x0, x0_p, probs = sdar_sample(logits, temperature, top_k, top_p)
            n = quota[min(step, denoising_steps - 1)]
            masked = int(mask_index.sum())
            k = min(n, masked) if only_masked else n
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            if remasking_strategy == "sequential":
                first = mask_index[0].nonzero(as_tuple=True)[0].min().item()
                transfer[0, first : first + n] = True
            elif remasking_strategy == "low_confidence_static":
                confidence = torch.where(mask_index, x0_p, -torch.inf)
                transfer[0, torch.topk(confidence[0], k)[1]] = True
            elif remasking_strategy == "low_confidence_dynamic":
                confidence = torch.where(mask_index, x0_p, -torch.inf)
                high = confidence[0] > confidence_threshold
                if high.sum() >= n:
                    transfer[0] = high
                else:
                    transfer[0, torch.topk(confidence[0], k)[1]] = True
            else:  # entropy_bounded, per position over the sampling distribution
                pc = probs.float().clamp_min(1e-12)
                entropies = torch.where(mask_index[0], -(pc * pc.log()).sum(-1), torch.inf)
                ent_sorted, order = torch.sort(entropies, descending=False)
                kk = torch.searchsorted(torch.cumsum(ent_sorted, 0), torch.tensor(eb_threshold), right=False).item()
                transfer[0, order[: max(1, min(kk, masked))]] = True
            cur_x[transfer] = x0[transfer]
            step += 1
        x[:, s:e] = cur_x
        if stopping_criteria_idx is not None and any(i in x[:, prompt_length:] for i in stopping_criteria_idx):
            break
    return x, passes


def llada2_forward(config: dict, sd: dict, ids, mask):
    """modeling_llada2_moe's LLaDA2MoeModelLM forward (SDPA), `mask` the additive (1, 1, t, t)
    block-diagonal-causal mask of generate(); float32 logits."""
    b, t = ids.shape
    nh, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or config["hidden_size"] // nh
    eps = config["rms_norm_eps"]
    x = F.embedding(ids, sd["model.word_embeddings.weight"])
    cos, sin = _hf_rope(config, t, x.dtype, hd)
    cos, sin = cos[:, None], sin[:, None]
    rd = cos.shape[-1]
    first_sparse = config.get("first_k_dense_replace", 0)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "attention."
        residual = x
        h = _rms(x, sd[p + "input_layernorm.weight"], eps)
        qkv = F.linear(h, sd[a + "query_key_value.weight"], sd.get(a + "query_key_value.bias")).view(b, t, -1, hd)
        q, k, v = (z.transpose(1, 2) for z in qkv.split([nh, nkv, nkv], dim=-2))
        q, k = _rms(q, sd[a + "query_layernorm.weight"], eps), _rms(k, sd[a + "key_layernorm.weight"], eps)
        q = torch.cat([q[..., :rd] * cos + _rotate_half(q[..., :rd]) * sin, q[..., rd:]], dim=-1)
        k = torch.cat([k[..., :rd] * cos + _rotate_half(k[..., :rd]) * sin, k[..., rd:]], dim=-1)
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[..., :t, :t].to(q.dtype), scale=hd**-0.5)
        att = att.transpose(1, 2).reshape(b, t, nh * hd)
        x = residual + F.linear(att, sd[a + "dense.weight"], sd.get(a + "dense.bias"))
        residual = x
        h = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)
        sparse = config.get("num_experts") is not None and i >= first_sparse
        x = residual + (_llada2_moe(config, sd, p + "mlp.", h) if sparse else _mlp(h, sd, p + "mlp."))
    x = _rms(x, sd["model.norm.weight"], eps)
    return F.linear(x, sd["lm_head.weight"]).float()


def _llada2_moe(config, sd, p, h):
    """LLaDA2MoeSparseMoeBlock at inference: LLaDA2MoeGate, then moe_infer over the sorted tokens."""
    b, t, hidden = h.shape
    flat = h.view(-1, hidden)
    logits = F.linear(flat.float(), sd[p + "gate.weight"].float())
    scores = torch.sigmoid(logits)
    biased = scores + sd[p + "gate.expert_bias"]
    n_group, top_k = config["n_group"], config["num_experts_per_tok"]
    group = biased.view(flat.shape[0], n_group, -1).topk(2, dim=-1)[0].sum(-1)
    picked = torch.topk(group, k=config["topk_group"], dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group).scatter_(1, picked, 1)
    expert_mask = group_mask[..., None].expand(-1, -1, config["num_experts"] // n_group).reshape(flat.shape[0], -1)
    chosen = torch.topk(biased.masked_fill(~expert_mask.bool(), float("-inf")), k=top_k, dim=-1)[1]
    weight = torch.gather(scores, 1, chosen)
    if top_k > 1:
        weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
    weight = weight * config["routed_scaling_factor"]
    order = chosen.view(-1).argsort()
    routed = flat[order // top_k]
    counts = torch.bincount(chosen.view(-1), minlength=config["num_experts"]).tolist()
    outs, at = [], 0
    for e, n in enumerate(counts):
        if n:
            outs.append(_mlp(routed[at : at + n], sd, p + f"experts.{e}."))
            at += n
    result = torch.empty_like(torch.cat(outs))
    result[order] = torch.cat(outs)
    y = (result.view(*chosen.shape, -1).float() * weight[..., None]).sum(dim=1).to(h.dtype).view(b, t, hidden)
    if config.get("num_shared_experts"):
        y = y + _mlp(h, sd, p + "shared_experts.")
    return y


def _block_canvas(prompt, mask_id, gen_length, block_length):
    """generate()'s canvas (the prompt, then masks to whole blocks) and its additive block-causal mask."""
    plen = prompt.shape[1]
    num_blocks = (plen + gen_length + block_length - 1) // block_length
    tril = torch.tril(torch.ones(num_blocks, num_blocks))
    mask = tril.repeat_interleave(block_length, 0).repeat_interleave(block_length, 1)[None, None].log()
    x = torch.full((1, num_blocks * block_length), mask_id, dtype=torch.long)
    x[:, :plen] = prompt
    return x, mask, num_blocks


def llada2_generate(
    config,
    sd,
    prompt,
    mask_id,
    eos_id,
    gen_length,
    block_length,
    steps,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    threshold=0.95,
    minimal_topk=1,
    eos_early_stop=False,
    greedy_at_zero=True,
):
    """LLaDA2MoeModelLM.generate, batch 1, global RNG: the canvas to `gen_length` (EOS and what
    follows included), and the forward passes. `greedy_at_zero=False`: the published sampling at
    temperature 0 (softmax of the unscaled logits, then a draw); True: greedy (what it says).
    The early stop looks for the first EOS of the answer (the published code's may be the prompt's)."""
    steps = min(steps, gen_length // minimal_topk)
    plen = prompt.shape[1]
    x, mask, num_blocks = _block_canvas(prompt, mask_id, gen_length, block_length)
    base, rem = divmod(block_length, steps)
    schedule = [base + (i < rem) for i in range(steps)]
    passes = 0
    for nb in range(plen // block_length, num_blocks):
        end = (nb + 1) * block_length
        cur = x[:, :end]
        for step in range(steps):
            active = cur[:, -block_length:] == mask_id
            if active.sum() == 0:
                break
            logits = llada2_forward(config, sd, cur, mask)[:, -block_length:][0]
            passes += 1
            if temperature == 0 and greedy_at_zero:
                x0, x0_p, _ = sdar_sample(logits, 0, top_k, top_p)
            else:
                x0, x0_p, _ = sdar_sample(logits, temperature if temperature > 0 else 1.0, top_k, top_p)
            conf = torch.where(active[0], x0_p, -torch.inf)
            high = conf > threshold
            transfer = torch.zeros_like(high)
            if int(high.sum()) >= schedule[step]:
                transfer = high
            else:
                transfer[torch.topk(conf, k=min(schedule[step], int(active.sum())))[1]] = True
            cur[0, -block_length:][transfer] = x0[transfer]
            if eos_early_stop and (x0[transfer] == eos_id).any():
                hits = (cur[0, plen:] == eos_id).nonzero()
                if len(hits) and not (cur[0, plen : plen + int(hits[0])] == mask_id).any():
                    return x[:, : plen + gen_length], passes
        if (x[0, plen:end] == eos_id).any():
            break
    return x[:, : plen + gen_length], passes


def llada21_generate(
    config,
    sd,
    prompt,
    mask_id,
    eos_id,
    gen_length,
    block_length,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    threshold=0.95,
    editing_threshold=0.9,
    max_post_steps=16,
    num_to_transfer=1,
    eos_early_stop=False,
):
    """LLaDA2.1's LLaDA2MoeModelLM.generate (token editing), batch 1, global RNG: the canvas to
    `gen_length` and the forward passes."""
    plen = prompt.shape[1]
    x, mask, num_blocks = _block_canvas(prompt, mask_id, gen_length, block_length)
    passes = 0
    for nb in range(plen // block_length, num_blocks):
        end = (nb + 1) * block_length
        cur = x[:, :end]
        in_prompt = torch.arange(nb * block_length, end) < plen
        post = 0
        while True:
            old = cur[0, -block_length:].clone()
            active = old == mask_id
            if not active.any():
                post += 1
            if post > max_post_steps:
                break
            logits = llada2_forward(config, sd, cur, mask)[0, -block_length:]
            passes += 1
            if temperature == 0:
                x0 = logits.argmax(-1)
                p = torch.gather(F.softmax(logits, dim=-1), -1, x0[:, None])[:, 0]
            else:
                x0, p, _ = sdar_sample(logits, temperature, top_k, top_p)
            reveal = torch.zeros_like(active)
            if active.any():
                conf = torch.where(active, p, -torch.inf)
                high = (conf > threshold) & active
                if int(high.sum()) >= num_to_transfer:
                    reveal = high
                else:
                    reveal[torch.topk(conf, k=min(num_to_transfer, int(active.sum())))[1]] = True
            editable = ~active & ~in_prompt
            edit = (torch.where(editable, p, -torch.inf) > editing_threshold) & editable & (x0 != old)
            both = reveal | edit
            cur[0, -block_length:][both] = x0[both]
            if not active.any() and not edit.any():
                break
        if eos_early_stop:
            answer = x[0, plen:end]
            if not (answer == mask_id).any() and (answer == eos_id).any():
                break
    return x[:, : plen + gen_length], passes
