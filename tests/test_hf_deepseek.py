import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.cli import main
from lmforge.core.config import from_dict
from lmforge.core.errors import LmforgeError
from lmforge.generate.engine import generate
from lmforge.generate.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer, load_model, save_model
from lmforge.model.hf.convert import from_hf, to_hf
from lmforge.model.hf.registry import hf_config_from_model

transformers = pytest.importorskip("transformers")

VOCAB = 128


def hf_config(**overrides):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return transformers.DeepseekV3Config(**{**base, **overrides})


def hf_model(**overrides):
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(hf_config(**overrides)).eval()
    with torch.no_grad():  # HF inits the router bias at 0 and experts small: make both matter
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.1)
            if hasattr(m, "gate_up_proj"):
                m.gate_up_proj.normal_(0, 0.1)
                m.down_proj.normal_(0, 0.1)
    return model


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 1.0}  # DeepSeek's 128K recipe


@pytest.mark.parametrize("overrides", [dict(), dict(q_lora_rank=None, rope_interleave=False),
                                       dict(rope_parameters=YARN)])
def test_import_matches_logits_and_greedy_ids_and_export_round_trips(tmp_path, overrides):
    hf = hf_model(**overrides)
    hf.save_pretrained(tmp_path / "hf")
    from_hf(tmp_path / "hf", tmp_path / "ours")
    ours = load_model(tmp_path / "ours")
    assert ours.cfg.attention == "mla" and ours.cfg.moe_experts == 8 and ours.cfg.moe_first_dense == 1
    x = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        ref = hf(x).logits
        torch.testing.assert_close(ours(x), ref, atol=1e-4, rtol=0)
        prompt = x[:1, :6]
        hf_ids = hf.generate(prompt, max_new_tokens=16, do_sample=False)[0, 6:].tolist()
    assert generate(ours, prompt[0].tolist(), SamplingParams(greedy=True, max_new_tokens=16)) == hf_ids

    to_hf(tmp_path / "ours", tmp_path / "back")
    back = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ref, atol=1e-5, rtol=0)
    # the released per-expert layout with the original (interleaved) RoPE rows, bit for bit
    original, exported = load_file(tmp_path / "hf/model.safetensors"), load_file(tmp_path / "back/model.safetensors")
    assert set(exported) == set(original)
    assert all(torch.equal(original[k], exported[k]) for k in original)


def test_fused_expert_tensors_and_mtp_layers_import(tmp_path):
    """HF 5.x in-memory names (experts.gate_up_proj) load too; an MTP layer (model.layers.{n}: eh_proj,
    enorm, hnorm, shared_head, a MoE block) becomes `model.mtp`, and exports back unchanged."""
    hf = hf_model()
    hf.save_pretrained(tmp_path / "hf")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}  # fused experts.gate_up_proj / down_proj
    torch.manual_seed(1)
    n = 3
    mtp = {k.replace("model.layers.2.", f"model.layers.{n}."): torch.randn_like(v) * 0.05
           for k, v in state.items() if k.startswith("model.layers.2.")}
    mtp.update({f"model.layers.{n}.{k}": torch.randn(*shape) * 0.05 for k, shape in
                (("eh_proj.weight", (64, 128)), ("enorm.weight", (64,)), ("hnorm.weight", (64,)),
                 ("shared_head.norm.weight", (64,)))})
    mtp[f"model.layers.{n}.embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
    mtp[f"model.layers.{n}.shared_head.head.weight"] = state["lm_head.weight"].clone()
    save_file({**state, **mtp}, tmp_path / "hf/model.safetensors")
    from_hf(tmp_path / "hf", tmp_path / "ours")
    ours = load_model(tmp_path / "ours")
    assert ours.cfg.mtp_depth == 1
    torch.testing.assert_close(ours.mtp.layers[0].proj.weight, mtp[f"model.layers.{n}.eh_proj.weight"])
    x = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=0)
    to_hf(tmp_path / "ours", tmp_path / "back")
    exported = load_file(tmp_path / "back/model.safetensors")
    for k, v in mtp.items():
        if "experts" not in k:
            assert torch.equal(exported[k], v), k
    assert json.loads((tmp_path / "back/config.json").read_text())["num_nextn_predict_layers"] == 1


def test_cli_convert_and_one_line_errors(tmp_path, capsys):
    hf_model().save_pretrained(tmp_path / "hf")
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert main(["convert", "to-hf", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    assert json.loads((tmp_path / "back/config.json").read_text())["model_type"] == "deepseek_v3"
    capsys.readouterr()

    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    (tmp_path / "hf/config.json").write_text(json.dumps({**cfg, "scoring_func": "softmax"}))
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err.strip()
    assert "scoring_func='softmax'" in err and len(err.splitlines()) == 1

    switch = Transformer(ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, moe_experts=4, moe_top_k=1))
    save_model(switch, tmp_path / "switch")
    with pytest.raises(LmforgeError, match="attention='mha' cannot be exported as DeepseekV3ForCausalLM"):
        to_hf(tmp_path / "switch", tmp_path / "switch-hf")


def test_deepseek_v3_preset_is_the_published_671b_shape():
    from lmforge.model.size import active_params, num_params

    cfg = from_dict(ModelConfig, {"preset": "deepseek-v3", "mtp_depth": 0}, "model.")
    assert num_params(cfg) == 671_026_404_352  # 671B main model (DeepSeek-V3 report, Table 1)
    assert 37.0e9 < active_params(cfg) < 37.7e9  # 37B activated per token
    hf = hf_config_from_model(cfg)  # the released config.json's 128K YaRN recipe
    assert hf["max_position_embeddings"] == 163840 and hf["rope_parameters"] == {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    assert transformers.DeepseekV3Config(**hf).n_routed_experts == 256
