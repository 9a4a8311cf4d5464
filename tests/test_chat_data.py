import pytest
import torch
from posttrain_fixtures import tiny_tokenizer

from lmforge.core.errors import LmforgeError
from lmforge.core.tensors import IGNORE_INDEX
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.chat import (
    encode_conversation,
    encode_prompt_response,
    pad_batch,
    prompt_ids,
    stop_token_ids,
)

CONV = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "copy: a b c"}, {"role": "assistant", "content": "a b c"},
        {"role": "user", "content": "reverse: x y"}, {"role": "assistant", "content": "y x"}]


def loss_text(tok, enc):
    return tok.decode([t for t in enc.labels if t != IGNORE_INDEX], skip_special_tokens=False)


def test_loss_only_on_assistant_tokens_multi_turn():
    tok = tiny_tokenizer()
    enc = encode_conversation(tok, CONV, max_len=256)
    full = [*enc.input_ids, enc.labels[-1]]
    # nothing outside the template: it starts with eos, as documents do in the pretraining shards
    assert tok.decode(full, skip_special_tokens=False) == tok.apply_chat_template(CONV, add_generation_prompt=False)
    assert full[0] == tok.eos_id
    assert len(enc.input_ids) == len(enc.labels)
    assert enc.labels == [t if t != IGNORE_INDEX else IGNORE_INDEX for t in enc.labels]
    # the targets with a loss are exactly the two assistant replies with their end markers
    assert loss_text(tok, enc) == "a b c<|end|>\ny x<|end|>\n"
    # labels are shifted: a counted label equals the next input token
    for t, label in enumerate(enc.labels[:-1]):
        if label != IGNORE_INDEX:
            assert enc.input_ids[t + 1] == label
    # no system / user / header token carries a loss
    user_ids = set(tok.encode("<|user|>\ncopy: a b c<|end|>\n<|system|>\nYou are terse.<|assistant|>\n"))
    masked = {label for label in enc.labels if label != IGNORE_INDEX}
    assert tok.tk.token_to_id("<|user|>") not in masked and tok.tk.token_to_id("<|assistant|>") not in masked
    assert masked - user_ids  # there is something besides


def test_prompt_response_and_prompt_ids_line_up():
    tok = tiny_tokenizer()
    prompt = CONV[:4]
    enc = encode_prompt_response(tok, prompt, "y x", max_len=256)
    assert loss_text(tok, enc) == "y x<|end|>\n"  # the earlier assistant turn is context only
    start = prompt_ids(tok, prompt)
    assert enc.input_ids[:len(start)] == start
    assert tok.decode(start, skip_special_tokens=False).endswith("<|assistant|>\n")
    first_loss = next(i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX)
    assert first_loss == len(start) - 1  # the last prompt token predicts the first response token
    assert stop_token_ids(tok) == [tok.tk.token_to_id("<|end|>"), tok.eos_id]


def test_truncation_is_flagged():
    tok = tiny_tokenizer()
    enc = encode_conversation(tok, CONV, max_len=10)
    assert enc.truncated and len(enc.input_ids) == 10 and len(enc.labels) == 10
    assert not encode_conversation(tok, CONV, max_len=256).truncated
    with pytest.raises(LmforgeError):
        encode_conversation(tok, CONV, max_len=0)


def test_pad_batch():
    tok = tiny_tokenizer()
    a = encode_conversation(tok, CONV[:3], 256)
    b = encode_conversation(tok, CONV, 256)
    inputs, labels = pad_batch([a, b], pad_id=tok.pad_id)
    assert inputs.shape == labels.shape == (2, len(b.input_ids))
    assert inputs[0, len(a.input_ids):].eq(tok.pad_id).all()
    assert labels[0, len(a.labels):].eq(IGNORE_INDEX).all()
    assert torch.equal(inputs[1], torch.tensor(b.input_ids))


def test_non_incremental_template_is_refused():
    tok = tiny_tokenizer()
    odd = Tokenizer(tok.tk, chat_template="{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}",
                    special_tokens=tok.special_tokens)
    with pytest.raises(LmforgeError, match="not incremental"):
        encode_conversation(odd, CONV, 64)
