"""Bottleneck adapters, prefix tuning, P-tuning v2 and prompt tuning: identity/near-identity at init, only their
tensors train, every method is transparent to losses and to KV-cache generation, files round-trip, and the
prompt/prefix files match HF PEFT (logits within 1e-4, both directions)."""

from __future__ import annotations

import json

import pytest
import torch
from tinymodels import DEBUG_VOCAB, debug_model, hf_model, random_ids, write_hf_llama
from torch import nn

from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.generate.batch import generate_batch
from lmforge.generate.engine import generate
from lmforge.generate.sampling import SamplingParams
from lmforge.model import load_model
from lmforge.peft import (
    AdapterConfig,
    PeftConfig,
    PrefixConfig,
    PromptConfig,
    apply_adapters,
    apply_peft,
    apply_prefix_tuning,
    apply_prompt_tuning,
    load_any_adapter,
    merge_adapter,
    save_trained,
)
from lmforge.peft.prompt import init_token_ids

METHODS = ["lora", "adapter", "prefix", "ptuning_v2", "prompt"]


def peft_cfg(method: str) -> PeftConfig:
    return from_dict(PeftConfig, {"method": method, "lora": {"targets": ["q_proj", "v_proj", "down_proj"]},
                                  "prefix": {"n_tokens": 5, "hidden": 32}, "prompt": {"n_tokens": 4}})


def perturb(model: nn.Module, seed: int = 0) -> None:
    """Move every trainable tensor off its init, so an adapter that is not applied cannot go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def test_bottleneck_adapter_is_identity_at_init_and_trains_only_itself():
    model = debug_model()
    x = random_ids()
    base = model(x)
    base_keys = set(model.state_dict())
    apply_adapters(model, AdapterConfig(size=8, where="both"))
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)
    assert base_keys < set(model.state_dict())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)
    assert len(trainable) == 4 * 2 * model.cfg.n_layers  # down/up weight+bias, attn and mlp, every block
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        y = random_ids(step)
        loss = nn.functional.cross_entropy(model(y[:, :-1]).flatten(0, 1), y[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert not torch.allclose(model.eval()(x), base, atol=1e-4)
    only_mlp = debug_model()
    apply_adapters(only_mlp, AdapterConfig(size=8, where="mlp"))
    assert all(".mlp.adapter." in n for n, p in only_mlp.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="adapter.size"):
        AdapterConfig(size=0)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_transparent_to_losses_and_kv_cache(method):
    model = debug_model()
    x = random_ids(length=10)
    apply_peft(model, peft_cfg(method))
    perturb(model)
    logits = model(x)
    assert logits.shape == (2, 10, DEBUG_VOCAB) and model(x, return_hidden=True).shape == (2, 10, model.cfg.d_model)
    torch.testing.assert_close(model.lm_head(model(x, return_hidden=True)), logits)
    # chunked prefill + single-token steps through the KV cache reproduce the full forward
    cache = model.new_cache(2, 10)
    parts = [model(x[:, :6], cache=cache, start_pos=0)]
    parts += [model(x[:, t:t + 1], cache=cache, start_pos=t) for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(parts, dim=1), logits, rtol=0, atol=1e-5)
    # greedy generation equals argmax over full forwards
    prompt = x[0, :5].tolist()
    out = generate(model, prompt, SamplingParams(greedy=True, max_new_tokens=6))
    seq = list(prompt)
    for _ in range(6):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[5:]
    # left-padded batches (masks, per-row positions) give each row what it gets alone
    prompts = [x[0, :3].tolist(), x[1, :7].tolist()]
    batch = generate_batch(model, prompts, SamplingParams(greedy=True, max_new_tokens=4))
    assert batch == [generate(model, p, SamplingParams(greedy=True, max_new_tokens=4)) for p in prompts]
    # gradients reach every trainable tensor, and only those
    model.zero_grad()
    model.train()
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


def test_virtual_tokens_count_against_max_seq_len():
    model = debug_model(max_seq_len=16)
    apply_prompt_tuning(model, PromptConfig(n_tokens=4))
    model(random_ids(length=12))
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=16 .4 of them virtual"):
        model(random_ids(length=13))
    # generation fills exactly the room the virtual tokens leave, single and batched
    assert model.context_length == 12
    prompt = random_ids(length=10)[0].tolist()
    assert len(generate(model, prompt, SamplingParams(greedy=True, max_new_tokens=50))) == 2
    assert len(generate(model, random_ids(length=30)[0].tolist(), SamplingParams(greedy=True, max_new_tokens=5))) == 1
    assert [len(o) for o in generate_batch(model, [prompt, prompt[:5]], SamplingParams(greedy=True,
                                                                                      max_new_tokens=50))] == [2, 2]


def test_prompt_init_from_vocabulary_text():
    assert init_token_ids([5, 6, 7], 7) == [5, 6, 7, 5, 6, 7, 5]
    assert init_token_ids([5, 6, 7, 8], 2) == [5, 6]
    model = debug_model()
    apply_prompt_tuning(model, PromptConfig(n_tokens=5), text_ids=[3, 9])
    torch.testing.assert_close(model.virtual_tokens.weight, model.embed.weight[[3, 9, 3, 9, 3]])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["virtual_tokens.weight"]
    with pytest.raises(ConfigError, match="prompt.tokenizer must be .* when prompt.init_text is given"):
        PromptConfig(init_text="hello")


def test_prompt_init_text_through_a_tokenizer(tmp_path):
    from textdata import SHAKESPEARE

    from lmforge.tokenizer.train import train_bpe

    tok = train_bpe([SHAKESPEARE.read_text()[:20000]], vocab_size=300)
    tok.save(tmp_path)
    model = debug_model(vocab_size=300)
    apply_prompt_tuning(model, PromptConfig(n_tokens=6, init_text="Classify the sentiment", tokenizer=str(tmp_path)))
    expected = init_token_ids(tok.encode("Classify the sentiment"), 6)
    torch.testing.assert_close(model.virtual_tokens.weight, model.embed.weight[expected])


def test_prefix_mlp_folds_away_and_ptuning_v2_has_no_mlp(tmp_path):
    model = debug_model()
    x = random_ids()
    apply_prefix_tuning(model, PrefixConfig(n_tokens=5, hidden=32))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".transform." in n for n in trainable) and all(n.startswith("virtual_tokens.") for n in trainable)
    perturb(model)
    expected = model(x)
    save_trained(model, peft_cfg("prefix"), tmp_path / "prefix")
    fresh = debug_model()
    load_any_adapter(fresh, tmp_path / "prefix")
    assert fresh.virtual_tokens.transform is None
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=1e-5)
    model.virtual_tokens.fold()
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
    v2 = debug_model()
    apply_peft(v2, peft_cfg("ptuning_v2"))
    assert v2.virtual_tokens.transform is None
    assert v2.virtual_tokens.embedding.weight.shape == (5, 2 * v2.cfg.n_layers * v2.cfg.n_kv_heads * v2.cfg.head_dim)


@pytest.mark.parametrize("method", METHODS)
def test_save_trained_then_load_gives_the_same_model(method, tmp_path):
    model = debug_model()
    x = random_ids()
    apply_peft(model, peft_cfg(method))
    perturb(model)
    expected = model(x)
    out = save_trained(model, peft_cfg(method), tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = debug_model()
    load_any_adapter(fresh, out)
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=1e-5)
    if method != "lora":
        with pytest.raises(LmforgeError, match="cannot be merged"):
            merge_adapter(fresh)


def test_lora_on_lm_head_is_refused_for_training():
    with pytest.raises(ConfigError, match="lm_head cannot be trained"):
        apply_peft(debug_model(), from_dict(PeftConfig, {"method": "lora", "lora": {"targets": ["q_proj", "lm_head"]}}))


def test_load_errors_are_one_line(tmp_path):
    model = debug_model()
    apply_peft(model, peft_cfg("prompt"))
    out = save_trained(model, peft_cfg("prompt"), tmp_path / "p")
    other = debug_model(d_model=32, n_heads=2, n_kv_heads=1)
    with pytest.raises(LmforgeError, match="token_dim 64 is not this model's d_model 32"):
        load_any_adapter(other, out)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(LmforgeError, match="peft_type 'IA3' is not supported"):
        load_any_adapter(debug_model(), out)
    model = debug_model()
    apply_peft(model, peft_cfg("prefix"))
    out = save_trained(model, peft_cfg("prefix"), tmp_path / "q")
    with pytest.raises(LmforgeError, match="num_layers=2, but this model needs 3"):
        load_any_adapter(debug_model(n_layers=3), out)
    model = debug_model()
    apply_peft(model, peft_cfg("adapter"))
    out = save_trained(model, peft_cfg("adapter"), tmp_path / "a")
    with pytest.raises(LmforgeError, match="adapter tensors do not match"):
        load_any_adapter(debug_model(n_layers=3), out)
    with pytest.raises(LmforgeError, match="not an adapter directory"):
        load_any_adapter(debug_model(), tmp_path)


# ----------------------------------------------------------------------------------------------
# HF PEFT interop: prompt tuning and prefix tuning files


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    return write_hf_llama(tmp_path_factory.mktemp("hf"))


@pytest.mark.parametrize("method", ["prompt", "prefix", "ptuning_v2"])
def test_lmforge_prompt_and_prefix_load_in_peft(method, hf_llama, tmp_path):
    peft = pytest.importorskip("peft")
    hf_dir, lmforge_dir = hf_llama
    model = load_model(lmforge_dir)
    x = random_ids()
    base = model(x)
    apply_peft(model, peft_cfg(method))
    perturb(model)
    ours = model(x)
    assert not torch.allclose(ours, base, atol=1e-3)
    save_trained(model, peft_cfg(method), tmp_path / "adapter")
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf_model(hf_dir), tmp_path / "adapter").eval()(x).logits
    theirs = theirs[:, -x.shape[1]:]  # prompt tuning: PEFT also returns the virtual tokens' logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["prompt", "prefix", "prefix_projection"])
def test_peft_prompt_and_prefix_load_in_lmforge(kind, hf_llama, tmp_path):
    peft = pytest.importorskip("peft")
    hf_dir, lmforge_dir = hf_llama
    torch.manual_seed(0)
    if kind == "prompt":
        cfg = peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    else:
        cfg = peft.PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM",
                                      prefix_projection=kind == "prefix_projection", encoder_hidden_size=32)
    peft_model = peft.get_peft_model(hf_model(hf_dir), cfg)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.5)
        x = random_ids()
        theirs = peft_model.eval()(x).logits[:, -x.shape[1]:]
    peft_model.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    model = load_model(lmforge_dir)
    assert not torch.allclose(model(x), theirs, atol=1e-3)
    kind_loaded = load_any_adapter(model, tmp_path / "adapter")
    assert kind_loaded == ("PROMPT_TUNING" if kind == "prompt" else "PREFIX_TUNING")
    torch.testing.assert_close(model(x), theirs, rtol=0, atol=1e-4)
