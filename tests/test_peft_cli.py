"""`lmforge generate --adapter` with both adapter formats, and `lmforge merge-adapter`."""

from __future__ import annotations

import json

import pytest
import torch
from tinymodels import debug_model, hf_model, write_hf_llama

from lmforge.cli import main
from lmforge.core.config import from_dict
from lmforge.generate.engine import generate
from lmforge.generate.sampling import SamplingParams
from lmforge.model import load_model, save_model
from lmforge.peft import PeftConfig, apply_peft, save_trained

PROMPT = [5, 17, 3, 42, 8]


def trained_adapter(base_dir, method: str, out_dir):
    """A perturbed adapter of `method` on the model in base_dir, saved; returns the adapted model too."""
    model = load_model(base_dir)
    cfg = from_dict(PeftConfig, {"method": method, "lora": {"dora": method == "lora"}, "prefix": {"n_tokens": 3}})
    apply_peft(model, cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    save_trained(model, cfg, out_dir)
    return model


def cli_json(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt", "adapter"])
def test_generate_with_adapter_matches_the_library(method, tmp_path, capsys):
    base_dir = save_model(debug_model(), tmp_path / "base")
    model = trained_adapter(base_dir, method, tmp_path / "adapter")
    params = SamplingParams(greedy=True, max_new_tokens=10)
    expected = generate(model, PROMPT, params)
    assert expected != generate(load_model(base_dir), PROMPT, params)
    out = cli_json(capsys, "generate", "--checkpoint", str(base_dir), "--adapter", str(tmp_path / "adapter"),
                   "--input-ids", " ".join(map(str, PROMPT)), "--sampling.greedy", "--json",
                   "--sampling.max-new-tokens", "10")
    assert out["ids"] == expected


def test_generate_with_a_peft_made_lora_adapter(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    hf_dir, lmforge_dir = write_hf_llama(tmp_path)
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(hf_model(hf_dir), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                        task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    peft_model.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    out = cli_json(capsys, "generate", "--checkpoint", str(lmforge_dir), "--adapter", str(tmp_path / "adapter"),
                   "--input-ids", " ".join(map(str, PROMPT)), "--sampling.greedy", "--json",
                   "--sampling.max-new-tokens", "8")
    seq = torch.tensor([PROMPT])
    with torch.no_grad():  # HF greedy decoding, one full forward per token
        for _ in range(8):
            seq = torch.cat([seq, peft_model.eval()(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert out["ids"] == seq[0, len(PROMPT):].tolist()


def test_merge_adapter_writes_a_plain_model(tmp_path, capsys):
    base_dir = save_model(debug_model(), tmp_path / "base")
    model = trained_adapter(base_dir, "lora", tmp_path / "adapter")
    x = torch.tensor([PROMPT])
    assert main(["merge-adapter", "--checkpoint", str(base_dir), "--adapter", str(tmp_path / "adapter"),
                 "--output", str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged")
    torch.testing.assert_close(merged(x), model(x), rtol=0, atol=1e-5)
    trained_adapter(base_dir, "prompt", tmp_path / "prompt")
    capsys.readouterr()
    code = main(["merge-adapter", "--checkpoint", str(base_dir), "--adapter", str(tmp_path / "prompt"),
                 "--output", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert code == 1 and "prompt and prefix tuning cannot be merged" in err and err.count("\n") == 1
    assert not (tmp_path / "nope").exists()
