"""The KV-cache engine against full recomputation, its stopping rules, `lmforge generate`, and HF parity."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.core.config import from_dict
from lmforge.core.errors import LmforgeError
from lmforge.generate.engine import generate, generate_stream
from lmforge.generate.sampling import SamplingParams, sample_next
from lmforge.model import ModelConfig, Transformer, load_model, save_model
from lmforge.model.hf.convert import from_hf

VOCAB = 64
PROMPT = [5, 17, 3, 42, 8]


def tiny_model(**overrides) -> Transformer:
    # A wider init than the default makes logits peaked, so argmax never hinges on float noise.
    cfg = from_dict(ModelConfig, {"preset": "debug", "vocab_size": VOCAB, "init_std": 0.3, **overrides})
    torch.manual_seed(0)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def model() -> Transformer:
    return tiny_model()


@torch.no_grad()
def generate_without_cache(model: Transformer, prompt: list[int], params: SamplingParams) -> list[int]:
    """Reference decoder: re-run the whole sequence every step, no cache."""
    generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
    seq = list(prompt)
    for _ in range(params.max_new_tokens):
        logits = model(torch.tensor([seq]))[:, -1]
        seq.append(int(sample_next(logits, params, generator)[0]))
    return seq[len(prompt):]


@pytest.mark.parametrize("params", [SamplingParams(greedy=True, max_new_tokens=30),
                                    SamplingParams(temperature=1.0, top_k=20, top_p=0.95, seed=3,
                                                   max_new_tokens=30)])
def test_cache_gives_same_tokens_as_full_recompute(model, params):
    assert generate(model, PROMPT, params) == generate_without_cache(model, PROMPT, params)


def test_prefill_once_then_one_token_per_step(model):
    fed: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: fed.append(args[0].shape[1]),
                                             with_kwargs=True)
    try:
        stream = generate_stream(model, PROMPT, SamplingParams(greedy=True, max_new_tokens=6))
        first = next(stream)
        assert fed == [len(PROMPT)]  # streaming: the first token arrives after the prefill alone
        rest = list(stream)
    finally:
        handle.remove()
    assert [first, *rest] == generate(model, PROMPT, SamplingParams(greedy=True, max_new_tokens=6))
    assert fed == [len(PROMPT)] + [1] * 5  # the last token is never fed back


def test_seeded_sampling_reproducible(model):
    params = SamplingParams(temperature=1.5, max_new_tokens=40, seed=11)
    a = generate(model, PROMPT, params)
    assert a == generate(model, PROMPT, params)
    other = generate(model, PROMPT, SamplingParams(temperature=1.5, max_new_tokens=40, seed=12))
    assert a != other


def test_stop_tokens_end_generation_and_are_not_returned(model):
    full = generate(model, PROMPT, SamplingParams(greedy=True, max_new_tokens=30))
    stop = full[4]
    cut = full.index(stop)
    assert generate(model, PROMPT, SamplingParams(greedy=True, max_new_tokens=30, stop_token_ids=[stop])) \
        == full[:cut]
    assert generate(model, PROMPT, SamplingParams(greedy=True, max_new_tokens=30,
                                                  stop_token_ids=[VOCAB - 1, stop])) == full[:cut]


def test_max_new_tokens(model):
    assert len(generate(model, PROMPT, SamplingParams(greedy=True, max_new_tokens=7))) == 7
    assert generate(model, PROMPT, SamplingParams(greedy=True, max_new_tokens=0)) == []


def test_stops_at_max_seq_len(model):
    max_len = model.cfg.max_seq_len
    prompt = [i % VOCAB for i in range(max_len - 10)]
    out = generate(model, prompt, SamplingParams(greedy=True, max_new_tokens=50))
    assert len(out) == 10
    assert out == generate_without_cache(model, prompt, SamplingParams(greedy=True, max_new_tokens=10))


def test_too_long_prompt_is_cut_from_the_left_with_a_warning(model, caplog):
    max_len = model.cfg.max_seq_len
    prompt = [(7 * i) % VOCAB for i in range(max_len + 30)]
    with caplog.at_level(logging.WARNING, logger="lmforge.generate.prompt"):
        out = generate(model, prompt, SamplingParams(greedy=True, max_new_tokens=5))
    assert "max_seq_len" in caplog.text
    assert out == generate(model, prompt[-(max_len - 1):], SamplingParams(greedy=True, max_new_tokens=5))
    assert len(out) == 1


def test_bad_prompts_are_user_errors(model):
    with pytest.raises(LmforgeError, match="empty"):
        generate(model, [], SamplingParams())
    with pytest.raises(LmforgeError, match="token 1 is 64"):
        generate(model, [1, VOCAB], SamplingParams())
    with pytest.raises(LmforgeError, match="token 0 is -1"):
        generate(model, [-1], SamplingParams())


def test_eval_mode_while_generating_and_mode_restored():
    model = tiny_model(dropout=0.5)
    model.train()
    params = SamplingParams(greedy=True, max_new_tokens=10)
    assert generate(model, PROMPT, params) == generate(model, PROMPT, params)  # no dropout noise
    assert model.training


# ---------------------------------------------------------------------------------------------
# lmforge generate


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model) -> Path:
    return save_model(model, tmp_path_factory.mktemp("ckpt") / "model")


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["generate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_json_matches_library(checkpoint, capsys):
    code, out, _ = run_cli(capsys, "--checkpoint", str(checkpoint), "--input-ids", "5 17 3 42 8", "--sampling.greedy",
                           "--json", "--sampling.max-new-tokens", "12")
    assert code == 0
    result = json.loads(out)
    expected = generate(load_model(checkpoint), PROMPT, SamplingParams(greedy=True, max_new_tokens=12))
    assert result == {"ids": expected, "text": None}


def test_cli_sampling_is_seeded(checkpoint, capsys):
    args = ["--checkpoint", str(checkpoint), "--input_ids", "1,2,3", "--json", "--sampling.max_new_tokens", "20",
            "--sampling.temperature", "1.2", "--sampling.top-k", "30", "--sampling.top-p", "0.9"]
    outs = [json.loads(run_cli(capsys, *args, "--sampling.seed", seed)[1])["ids"] for seed in ("4", "4", "5")]
    assert outs[0] == outs[1] != outs[2]
    params = SamplingParams(temperature=1.2, top_k=30, top_p=0.9, max_new_tokens=20, seed=4)
    assert outs[0] == generate(load_model(checkpoint), [1, 2, 3], params)


def test_cli_streams_ids_without_tokenizer(checkpoint, capsys):
    code, out, _ = run_cli(capsys, "--checkpoint", str(checkpoint), "--input-ids", "5 17 3 42 8", "--sampling.greedy",
                           "--sampling.max-new-tokens", "6")
    assert code == 0
    expected = generate(load_model(checkpoint), PROMPT, SamplingParams(greedy=True, max_new_tokens=6))
    assert out.split() == [str(t) for t in PROMPT + expected]


@pytest.mark.parametrize("args, message", [
    (["--prompt", "hello"], "tokenizer.json"),
    ([], "tokenizer.json"),
    (["--input-ids", "1 two 3"], "'two' is not an integer"),
    (["--input-ids", "1 999"], "outside the model's vocabulary"),
    (["--input-ids", "1", "--prompt", "hi"], "not both"),
    (["--input-ids", "1", "--sampling.top-p", "0"], "top_p"),
])
def test_cli_user_errors_are_one_line(checkpoint, capsys, args, message):
    code, out, err = run_cli(capsys, "--checkpoint", str(checkpoint), *args)
    assert code != 0 and out == ""
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_missing_checkpoint(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--checkpoint", str(tmp_path / "nope"), "--input-ids", "1")
    assert code != 0 and "nope" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# parity with Hugging Face transformers


def test_greedy_matches_hf_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, initializer_range=0.3, bos_token_id=None, eos_token_id=None,
        pad_token_id=None)
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    hf_model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    from_hf(tmp_path / "hf", tmp_path / "lmforge")
    model = load_model(tmp_path / "lmforge")

    new_tokens = 25
    with torch.no_grad():
        prompt = torch.tensor([PROMPT])
        hf_out = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                                   pad_token_id=0)
    hf_ids = hf_out[0, len(PROMPT):].tolist()
    assert len(hf_ids) == new_tokens
    assert generate(model, PROMPT, SamplingParams(greedy=True, max_new_tokens=new_tokens)) == hf_ids


# ---------------------------------------------------------------------------------------------
# lmforge generate with a tokenizer beside the weights

TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
        "Le café est très bon; naïve façade, crème brûlée. ") * 20
EOS_AT = 3  # the position at which the relabelled checkpoint below emits eos


def greedy_ids(model: Transformer, prompt: list[int], n: int) -> list[int]:
    return generate(model, prompt, SamplingParams(greedy=True, max_new_tokens=n))


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory):
    """A tiny model saved with a trained byte-level BPE tokenizer; returns (dir, model, tokenizer)."""
    from lmforge.tokenizer.train import train_bpe

    tokenizer = train_bpe([TEXT], vocab_size=300, show_progress=False)
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    directory = save_model(model, tmp_path_factory.mktemp("ckpt") / "text")
    tokenizer.save(directory)
    return directory, model, tokenizer


def test_cli_prompt_text_json(text_checkpoint, capsys):
    directory, model, tokenizer = text_checkpoint
    code, out, _ = run_cli(capsys, "--checkpoint", str(directory), "--prompt", "Speak, speak.", "--sampling.greedy",
                           "--json", "--sampling.max-new-tokens", "15")
    assert code == 0
    result = json.loads(out)
    prompt = tokenizer.sequence_start + tokenizer.encode("Speak, speak.")
    expected = generate(model, prompt, SamplingParams(greedy=True, max_new_tokens=15,
                                                      stop_token_ids=[tokenizer.eos_id]))
    assert result == {"ids": expected, "text": tokenizer.decode(expected)}


def test_cli_streams_prompt_then_text(text_checkpoint, capsys):
    directory, model, tokenizer = text_checkpoint
    code, out, _ = run_cli(capsys, "--checkpoint", str(directory), "--prompt", "Le café",
                           "--sampling.temperature", "1.0", "--sampling.seed", "3", "--sampling.max-new-tokens", "20")
    assert code == 0
    params = SamplingParams(temperature=1.0, seed=3, max_new_tokens=20, stop_token_ids=[tokenizer.eos_id])
    expected = generate(model, tokenizer.sequence_start + tokenizer.encode("Le café"), params)
    assert out == "Le café" + tokenizer.decode(expected) + "\n"


def test_cli_empty_prompt_starts_from_the_sequence_start(text_checkpoint, capsys):
    directory, model, tokenizer = text_checkpoint
    code, out, _ = run_cli(capsys, "--checkpoint", str(directory), "--sampling.greedy", "--json",
                           "--sampling.max-new-tokens", "5")
    assert code == 0
    assert json.loads(out)["ids"] == greedy_ids(model, tokenizer.sequence_start, 5)


def test_cli_stops_on_tokenizer_eos(text_checkpoint, tmp_path, capsys):
    """Relabel the model's outputs so that the token it would emit at step EOS_AT becomes eos.

    Swapping two rows of the LM head (untied from the embedding) permutes the logits exactly, so the
    relabelled model generates the same sequence with the two ids exchanged, whatever the prompt holds
    (it starts with eos: the sequence start)."""
    directory, model, tokenizer = text_checkpoint
    prompt = tokenizer.sequence_start + tokenizer.encode("All:")
    full = greedy_ids(model, prompt, 10)
    target, eos = full[EOS_AT], tokenizer.eos_id
    assert eos not in full[:EOS_AT + 1] and target not in full[:EOS_AT]
    assert not model.cfg.tie_embeddings
    relabelled = tiny_model(vocab_size=tokenizer.vocab_size)
    relabelled.load_state_dict(model.state_dict())
    with torch.no_grad():
        weight = relabelled.lm_head.weight
        weight[[eos, target]] = weight[[target, eos]]
    save_model(relabelled, tmp_path / "relabelled")
    tokenizer.save(tmp_path / "relabelled")
    code, out, _ = run_cli(capsys, "--checkpoint", str(tmp_path / "relabelled"), "--prompt", "All:",
                           "--sampling.greedy", "--json", "--sampling.max-new-tokens", "10")
    assert code == 0
    assert json.loads(out)["ids"] == full[:EOS_AT]


def test_cli_tokenizer_larger_than_model_vocab(text_checkpoint, tmp_path, capsys):
    _, _, tokenizer = text_checkpoint
    save_model(tiny_model(), tmp_path / "small_vocab")  # VOCAB = 64 < the tokenizer's 300
    tokenizer.save(tmp_path / "small_vocab")
    code, _, err = run_cli(capsys, "--checkpoint", str(tmp_path / "small_vocab"), "--prompt", "hi")
    assert code != 0 and "vocab_size" in err and err.count("\n") == 1


def test_cli_stop_strings_end_generation(text_checkpoint, capsys):
    directory, model, tokenizer = text_checkpoint
    params = SamplingParams(temperature=1.0, seed=3, max_new_tokens=30, stop_token_ids=[tokenizer.eos_id])
    full_ids = generate(model, tokenizer.sequence_start + tokenizer.encode("Le café"), params)
    full = tokenizer.decode(full_ids)
    at = next(i for i in range(len(full) // 2, len(full) - 1) if "\ufffd" not in full[i:i + 2])  # whole characters
    stop = full[at:at + 2]
    cut = full[:full.find(stop)]
    n = next(i for i in range(1, len(full_ids) + 1) if stop in tokenizer.decode(full_ids[:i]))
    args = ["--checkpoint", str(directory), "--prompt", "Le café", "--sampling.temperature", "1.0",
            "--sampling.seed", "3", "--sampling.max-new-tokens", "30", "--stop", stop]
    code, out, _ = run_cli(capsys, *args, "--json")
    assert code == 0 and json.loads(out) == {"ids": full_ids[:n], "text": cut}
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and out == "Le café" + cut + "\n"
