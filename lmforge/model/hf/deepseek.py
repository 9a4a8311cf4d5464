"""DeepSeek-V3 (`DeepseekV3ForCausalLM`: MLA + DeepSeekMoE + MTP), the family `--family auto` picks for
lmforge models with MLA or MoE layers.

The mapping is exact. Fused lmforge tensors are row concatenations (`mlp.up = [gate_proj; up_proj]`, expert
`up[j] = [experts.j.gate_proj; experts.j.up_proj]`); HF's 3-D `experts.gate_up_proj` has that layout already.
DeepSeek stores RoPE dimensions as interleaved pairs (`rope_interleave`); lmforge rotates half-split vectors,
so the RoPE rows of the query and of `kv_a_proj_with_mqa` are permuted evens-then-odds on import (the dot
products are unchanged) and back on export. MTP modules (`model.layers.{n_layers + k}` with eh_proj, enorm,
hnorm, shared_head.norm) are imported when the checkpoint has them; their embedding and head copies are the
shared ones and are dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lmforge.core.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.hf.base import HFAdapter, ModuleMap, config_from_values, expected_shapes, require, unexplained
from lmforge.model.hf.llama import llama_module_map
from lmforge.model.hf.rope import rope_from_hf, rope_to_hf
from lmforge.model.moe import is_moe_layer

ARCHITECTURE = "DeepseekV3ForCausalLM"

DEFAULTS: dict[str, Any] = dict(  # DeepseekV3Config defaults (save_pretrained drops default values)
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
    num_attention_heads=128, n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512,
    q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4,
    num_experts_per_tok=8, first_k_dense_replace=3, norm_topk_prob=True, hidden_act="silu",
    max_position_embeddings=4096, initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_interleave=True, attention_bias=False, rope_theta=10000.0, num_nextn_predict_layers=1)


# ----------------------------------------------------------------------------------------------
# configs


def config_from_hf(hf: dict[str, Any], source: str = "HF config") -> ModelConfig:
    """ModelConfig for a DeepseekV3 `config.json`, without MTP (`fit_weights` counts the modules)."""
    get = {**DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}.get
    if get("hidden_act") != "silu" or get("attention_bias"):
        raise LmforgeError(f"{source}: hidden_act={get('hidden_act')!r}, attention_bias={get('attention_bias')} "
                           "is not supported (DeepSeek-V3 uses silu, no attention bias)")
    if hf.get("scoring_func", "sigmoid") != "sigmoid" or hf.get("topk_method", "noaux_tc") != "noaux_tc":
        raise LmforgeError(f"{source}: scoring_func={hf.get('scoring_func')!r}, topk_method="
                           f"{hf.get('topk_method')!r}: only DeepSeek-V3's sigmoid/noaux_tc routing is supported")
    max_len = int(get("max_position_embeddings"))
    hf, mscale = without_mscale(hf)
    rope = rope_from_hf(hf, get("rope_theta"), max_len, source)
    values = dict(
        vocab_size=get("vocab_size"), d_model=get("hidden_size"), n_layers=get("num_hidden_layers"),
        n_heads=get("num_attention_heads"), d_ff=get("intermediate_size"), max_seq_len=rope.pop("max_seq_len", max_len),
        norm="rmsnorm", norm_eps=get("rms_norm_eps"), norm_placement="pre", mlp="swiglu", position="rope",
        **rope, tie_embeddings=bool(get("tie_word_embeddings")),
        init_std=get("initializer_range"), attention="mla", kv_lora_rank=get("kv_lora_rank"),
        q_lora_rank=hf.get("q_lora_rank", DEFAULTS["q_lora_rank"]) or 0,  # explicit null: no q compression
        qk_rope_head_dim=get("qk_rope_head_dim"),
        qk_nope_head_dim=get("qk_nope_head_dim"), v_head_dim=get("v_head_dim"),
        moe_experts=get("n_routed_experts"), moe_top_k=get("num_experts_per_tok"),
        moe_shared_experts=get("n_shared_experts"), moe_d_ff=get("moe_intermediate_size"), moe_router="sigmoid",
        moe_norm_top_k=bool(get("norm_topk_prob")), moe_routed_scale=get("routed_scaling_factor"),
        moe_groups=get("n_group"), moe_top_groups=get("topk_group"), moe_first_dense=get("first_k_dense_replace"),
        mla_mscale=mscale.get("mscale", 0.0), mla_mscale_all_dim=mscale.get("mscale_all_dim", 0.0),
    )
    return config_from_values(values, source)


def without_mscale(hf: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """`hf` with DeepSeek's YaRN keys (mscale, mscale_all_dim) taken out of its RoPE spec, and their values."""
    out, found = dict(hf), {}
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(hf.get(key), dict):
            spec = dict(hf[key])
            for name in ("mscale", "mscale_all_dim"):
                value = spec.pop(name, None)
                if value:
                    found[name] = float(value)
            out[key] = spec
    return out, found


def check_deepseek_compatible(cfg: ModelConfig) -> None:
    """Raise naming the first ModelConfig value DeepseekV3ForCausalLM cannot express."""
    wanted = dict(attention="mla", norm="rmsnorm", norm_placement="pre", mlp="swiglu", position="rope",
                  moe_router="sigmoid", bias=False, qkv_bias=False, moe_capacity_factor=0.0)
    require(cfg, wanted, ARCHITECTURE)
    if cfg.rope_scaling not in ("none", "yarn"):
        raise LmforgeError(f"model.rope_scaling={cfg.rope_scaling!r} cannot be exported as DeepseekV3ForCausalLM "
                           "(it needs 'none' or 'yarn')")
    if cfg.moe_experts == 0 or cfg.moe_shared_experts == 0 or cfg.moe_first_dense >= cfg.n_layers:
        raise LmforgeError("model: DeepseekV3ForCausalLM needs MoE layers (moe_experts > 0, moe_shared_experts > 0, "
                           "moe_first_dense < n_layers)")


def config_to_hf(cfg: ModelConfig, interleaved: bool = True) -> dict[str, Any]:
    """DeepseekV3 `config.json` keys; `interleaved` is rope_interleave (kept from the imported config)."""
    rope = rope_to_hf(cfg)
    for key, value in (("mscale", cfg.mla_mscale), ("mscale_all_dim", cfg.mla_mscale_all_dim)):
        if value:
            rope["rope_parameters"][key] = rope["rope_scaling"][key] = value
    return {
        "architectures": [ARCHITECTURE], "model_type": "deepseek_v3", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "moe_intermediate_size": cfg.moe_d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
        "n_shared_experts": cfg.moe_shared_experts, "n_routed_experts": cfg.moe_experts,
        "routed_scaling_factor": cfg.moe_routed_scale, "kv_lora_rank": cfg.kv_lora_rank,
        "q_lora_rank": cfg.q_lora_rank or None, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "v_head_dim": cfg.v_head_dim, "n_group": cfg.moe_groups,
        "topk_group": cfg.moe_top_groups, "num_experts_per_tok": cfg.moe_top_k,
        "first_k_dense_replace": cfg.moe_first_dense, "norm_topk_prob": cfg.moe_norm_top_k, "hidden_act": "silu",
        "initializer_range": cfg.init_std, "rms_norm_eps": cfg.norm_eps, **rope,
        "tie_word_embeddings": cfg.tie_embeddings, "rope_interleave": interleaved, "attention_bias": False,
        "num_nextn_predict_layers": cfg.mtp_depth, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "use_cache": True,
    }


# ----------------------------------------------------------------------------------------------
# weights


def rope_rows(cfg: ModelConfig, rows: int, offset: int, stride: int) -> torch.Tensor:
    """Row order taking interleaved RoPE pairs to half-split: within each `stride`-row group the dr rows
    at `offset` become [evens; odds]."""
    dr = cfg.qk_rope_head_dim
    order = torch.arange(rows)
    inner = torch.cat([torch.arange(0, dr, 2), torch.arange(1, dr, 2)])
    for start in range(offset, rows, stride):
        order[start:start + dr] = start + inner
    return order


def _permutations(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """lmforge attention tensor suffix -> row order applied on import (its inverse on export)."""
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    q = rope_rows(cfg, cfg.n_heads * qk, cfg.qk_nope_head_dim, qk)
    kv_rows = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    kv = rope_rows(cfg, kv_rows, cfg.kv_lora_rank, kv_rows)
    return {"attn.q.weight": q, "attn.q_b.weight": q, "attn.kv_a.weight": kv}


def _layer_names(cfg: ModelConfig, ours: str, hf: str, moe: bool) -> list[tuple[str, list[str]]]:
    """(lmforge key, HF keys stacked along dim 0) for one decoder block."""
    at = hf + "self_attn."
    attn = [("q_a", "q_a_proj"), ("q_norm", "q_a_layernorm"), ("q_b", "q_b_proj")] if cfg.q_lora_rank else \
        [("q", "q_proj")]
    attn += [("kv_a", "kv_a_proj_with_mqa"), ("kv_norm", "kv_a_layernorm"), ("kv_b", "kv_b_proj"), ("out", "o_proj")]
    out = [(f"{ours}attn_norm.weight", [hf + "input_layernorm.weight"]),
           (f"{ours}mlp_norm.weight", [hf + "post_attention_layernorm.weight"])]
    out += [(f"{ours}attn.{a}.weight", [f"{at}{b}.weight"]) for a, b in attn]
    mlp = hf + "mlp."
    if moe:
        out += [(f"{ours}mlp.router.gate.weight", [mlp + "gate.weight"]),
                (f"{ours}mlp.router.bias", [mlp + "gate.e_score_correction_bias"]),
                (f"{ours}mlp.shared.up.weight", [mlp + "shared_experts.gate_proj.weight",
                                                 mlp + "shared_experts.up_proj.weight"]),
                (f"{ours}mlp.shared.down.weight", [mlp + "shared_experts.down_proj.weight"])]
    else:
        out += [(f"{ours}mlp.up.weight", [mlp + "gate_proj.weight", mlp + "up_proj.weight"]),
                (f"{ours}mlp.down.weight", [mlp + "down_proj.weight"])]
    return out


def _blocks(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(lmforge prefix, HF prefix, is MoE) of every block, MTP blocks (HF layers n_layers + k) included."""
    out = [(f"blocks.{i}.", f"model.layers.{i}.", is_moe_layer(cfg, i)) for i in range(cfg.n_layers)]
    out += [(f"mtp.layers.{k}.block.", f"model.layers.{cfg.n_layers + k}.", is_moe_layer(cfg, cfg.n_layers + k))
            for k in range(cfg.mtp_depth)]
    return out


def name_map(cfg: ModelConfig) -> list[tuple[str, list[str]]]:
    """Every plain (non-expert) tensor: (lmforge key, HF keys concatenated along dim 0)."""
    out = [("embed.weight", ["model.embed_tokens.weight"]), ("norm.weight", ["model.norm.weight"])]
    if not cfg.tie_embeddings:
        out.append(("lm_head.weight", ["lm_head.weight"]))
    for ours, hf, moe in _blocks(cfg):
        out += _layer_names(cfg, ours, hf, moe)
    for k in range(cfg.mtp_depth):
        hf = f"model.layers.{cfg.n_layers + k}."
        out += [(f"mtp.layers.{k}.{a}.weight", [f"{hf}{b}.weight"])
                for a, b in (("enorm", "enorm"), ("hnorm", "hnorm"), ("proj", "eh_proj"), ("norm", "shared_head.norm"))]
    return out


def _take(hf_state: dict[str, torch.Tensor], key: str, used: set[str]) -> torch.Tensor:
    if key not in hf_state:
        raise LmforgeError(f"HF weights have no tensor '{key}' (the config expects it)")
    used.add(key)
    return hf_state[key]


def _experts_from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig, mlp: str, used: set[str]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked expert weights from per-expert tensors (checkpoints) or HF 5.x's fused 3-D ones."""
    if mlp + "experts.gate_up_proj" in hf_state:
        return _take(hf_state, mlp + "experts.gate_up_proj", used), _take(hf_state, mlp + "experts.down_proj", used)
    e = mlp + "experts."
    up = torch.stack([torch.cat([_take(hf_state, f"{e}{j}.gate_proj.weight", used),
                                 _take(hf_state, f"{e}{j}.up_proj.weight", used)]) for j in range(cfg.moe_experts)])
    down = torch.stack([_take(hf_state, f"{e}{j}.down_proj.weight", used) for j in range(cfg.moe_experts)])
    return up, down


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig, interleaved: bool = True
                       ) -> dict[str, torch.Tensor]:
    """lmforge tensors from DeepseekV3 tensors (`interleaved`: the config's rope_interleave); a missing,
    extra or mis-shaped tensor raises."""
    used: set[str] = set()
    state = {}
    for ours, theirs in name_map(cfg):
        parts = [_take(hf_state, k, used) for k in theirs]
        state[ours] = parts[0] if len(parts) == 1 else torch.cat(parts)
    for ours, hf, moe in _blocks(cfg):
        if moe:
            state[f"{ours}mlp.experts.up"], state[f"{ours}mlp.experts.down"] = _experts_from_hf(
                hf_state, cfg, hf + "mlp.", used)
    perms = _permutations(cfg) if interleaved else {}
    for key in state:
        suffix = next((s for s in perms if key.endswith(s)), None)
        if suffix:
            state[key] = state[key][perms[suffix]]
    shapes = expected_shapes(cfg)
    for key, shape in shapes.items():
        if tuple(state[key].shape) != shape:
            raise LmforgeError(f"HF tensors for '{key}' have shape {tuple(state[key].shape)}; the config expects "
                               f"{shape}")
    mtp_copies = tuple(f"model.layers.{cfg.n_layers + k}.{n}" for k in range(cfg.mtp_depth)
                       for n in ("embed_tokens.weight", "shared_head.head.weight"))
    unexpected = sorted(k for k in hf_state if k not in used and not k.endswith("rotary_emb.inv_freq")
                        and k not in mtp_copies and not (cfg.tie_embeddings and k == "lm_head.weight"))
    if unexpected:
        raise unexplained(unexpected)
    return state


def state_dict_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, interleaved: bool = True
                     ) -> dict[str, torch.Tensor]:
    """DeepseekV3 tensors (per-expert layout, as released checkpoints and `save_pretrained` write them)."""
    check_deepseek_compatible(cfg)
    for key, shape in expected_shapes(cfg).items():
        if key not in state or tuple(state[key].shape) != shape:
            got = tuple(state[key].shape) if key in state else "missing"
            raise LmforgeError(f"checkpoint tensor '{key}': {got}, the config expects {shape}")
    perms = _permutations(cfg) if interleaved else {}
    hf_state = {}
    for ours, theirs in name_map(cfg):
        w = state[ours]
        suffix = next((s for s in perms if ours.endswith(s)), None)
        if suffix:
            w = w[torch.argsort(perms[suffix])]
        for name, part in zip(theirs, w.chunk(len(theirs))):
            hf_state[name] = part
    for ours, hf, moe in _blocks(cfg):
        if not moe:
            continue
        up, down = state[f"{ours}mlp.experts.up"], state[f"{ours}mlp.experts.down"]
        for j in range(cfg.moe_experts):
            gate_w, up_w = up[j].chunk(2)
            e = f"{hf}mlp.experts.{j}."
            hf_state.update({e + "gate_proj.weight": gate_w, e + "up_proj.weight": up_w,
                             e + "down_proj.weight": down[j]})
    for k in range(cfg.mtp_depth):  # the released layout keeps the MTP module's own embedding/head copies
        hf = f"model.layers.{cfg.n_layers + k}."
        hf_state[hf + "embed_tokens.weight"] = state["embed.weight"]
        hf_state[hf + "shared_head.head.weight"] = state["embed.weight" if cfg.tie_embeddings else "lm_head.weight"]
    return hf_state


# ----------------------------------------------------------------------------------------------
# the adapter


def lora_module_map(cfg: ModelConfig) -> ModuleMap:
    """The modules DeepSeek-V3 names as LLaMA does (o_proj, the dense layers' MLP, lm_head): the ones LoRA
    can target. MLA's projections are left out (HF stores their RoPE rows interleaved), as is MoE."""
    dense = {f"blocks.{i}.mlp.{m}" for i in range(cfg.n_layers) if not is_moe_layer(cfg, i) for m in ("up", "down")}
    return [(ours, theirs) for ours, theirs in llama_module_map(cfg)
            if not (ours.endswith((".mlp.up", ".mlp.down")) and ours not in dense)
            and not (ours.endswith(".attn.qkv") and cfg.attention == "mla")]


class DeepSeekV3Adapter(HFAdapter):
    model_type, architecture = "deepseek_v3", ARCHITECTURE
    fp32_suffixes = ("e_score_correction_bias",)  # HF keeps the router bias in fp32 too

    def claims(self, cfg: ModelConfig, recorded: str | None) -> bool:
        return cfg.attention == "mla" or bool(cfg.moe_experts)

    def config_from_hf(self, hf: dict[str, Any], source: str) -> ModelConfig:
        return config_from_hf(hf, source)

    def fit_weights(self, cfg: ModelConfig, hf_state: dict[str, torch.Tensor]) -> ModelConfig:
        """MTP modules are HF layers n_layers + k with an eh_proj: as many as the checkpoint holds."""
        depth = 0
        while f"model.layers.{cfg.n_layers + depth}.eh_proj.weight" in hf_state:
            depth += 1
        return dataclasses.replace(cfg, mtp_depth=depth) if depth else cfg

    def record(self, hf: dict[str, Any]) -> dict[str, Any]:
        return {"rope_interleave": interleaved(hf)}

    def check(self, cfg: ModelConfig) -> None:
        check_deepseek_compatible(cfg)

    def config_to_hf(self, cfg: ModelConfig, meta: dict[str, Any]) -> dict[str, Any]:
        return config_to_hf(cfg, interleaved(meta))

    def module_map(self, cfg: ModelConfig) -> ModuleMap:
        return lora_module_map(cfg)

    def state_dict_from_hf(self, hf_state: dict[str, torch.Tensor], cfg: ModelConfig,
                           meta: dict[str, Any]) -> dict[str, torch.Tensor]:
        return state_dict_from_hf(hf_state, cfg, interleaved(meta))

    def state_dict_to_hf(self, state: dict[str, torch.Tensor], cfg: ModelConfig,
                         meta: dict[str, Any]) -> dict[str, torch.Tensor]:
        return state_dict_to_hf(state, cfg, interleaved(meta))


def interleaved(meta: dict[str, Any]) -> bool:
    """rope_interleave of an HF config or of what `from_hf` recorded (DeepSeek's default: interleaved)."""
    return bool(meta.get("rope_interleave", DEFAULTS["rope_interleave"]))
