import pytest
import torch

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


def loss_text(tokenizer, enc):
    return tokenizer.decode([t for t in enc.labels if t != IGNORE_INDEX], skip_special_tokens=False)


def test_loss_only_on_assistant_tokens_multi_turn(tokenizer):
    enc = encode_conversation(tokenizer, CONV, max_len=256)
    full = [*enc.input_ids, enc.labels[-1]]
    # nothing outside the template: it starts with eos, as documents do in the pretraining shards
    assert tokenizer.decode(full, skip_special_tokens=False) == tokenizer.apply_chat_template(
        CONV, add_generation_prompt=False)
    assert full[0] == tokenizer.eos_id
    assert len(enc.input_ids) == len(enc.labels)
    assert enc.labels == [t if t != IGNORE_INDEX else IGNORE_INDEX for t in enc.labels]
    # the targets with a loss are exactly the two assistant replies with their end markers
    assert loss_text(tokenizer, enc) == "a b c<|end|>\ny x<|end|>\n"
    # labels are shifted: a counted label equals the next input token
    for t, label in enumerate(enc.labels[:-1]):
        if label != IGNORE_INDEX:
            assert enc.input_ids[t + 1] == label
    # no system / user / header token carries a loss
    user_ids = set(tokenizer.encode("<|user|>\ncopy: a b c<|end|>\n<|system|>\nYou are terse.<|assistant|>\n"))
    masked = {label for label in enc.labels if label != IGNORE_INDEX}
    assert tokenizer.tk.token_to_id("<|user|>") not in masked
    assert tokenizer.tk.token_to_id("<|assistant|>") not in masked
    assert masked - user_ids  # there is something besides


def test_prompt_response_and_prompt_ids_line_up(tokenizer):
    prompt = CONV[:4]
    enc = encode_prompt_response(tokenizer, prompt, "y x", max_len=256)
    assert loss_text(tokenizer, enc) == "y x<|end|>\n"  # the earlier assistant turn is context only
    start = prompt_ids(tokenizer, prompt)
    assert enc.input_ids[:len(start)] == start
    assert tokenizer.decode(start, skip_special_tokens=False).endswith("<|assistant|>\n")
    first_loss = next(i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX)
    assert first_loss == len(start) - 1  # the last prompt token predicts the first response token
    assert stop_token_ids(tokenizer) == [tokenizer.tk.token_to_id("<|end|>"), tokenizer.eos_id]


def test_truncation_is_flagged(tokenizer):
    enc = encode_conversation(tokenizer, CONV, max_len=10)
    assert enc.truncated and len(enc.input_ids) == 10 and len(enc.labels) == 10
    assert not encode_conversation(tokenizer, CONV, max_len=256).truncated
    with pytest.raises(LmforgeError):
        encode_conversation(tokenizer, CONV, max_len=0)


def test_pad_batch(tokenizer):
    a = encode_conversation(tokenizer, CONV[:3], 256)
    b = encode_conversation(tokenizer, CONV, 256)
    inputs, labels = pad_batch([a, b], pad_id=tokenizer.pad_id)
    assert inputs.shape == labels.shape == (2, len(b.input_ids))
    assert inputs[0, len(a.input_ids):].eq(tokenizer.pad_id).all()
    assert labels[0, len(a.labels):].eq(IGNORE_INDEX).all()
    assert torch.equal(inputs[1], torch.tensor(b.input_ids))


def test_non_incremental_template_is_refused(tokenizer):
    odd = Tokenizer(tokenizer.tk, chat_template="{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}",
                    special_tokens=tokenizer.special_tokens)
    with pytest.raises(LmforgeError, match="not incremental"):
        encode_conversation(odd, CONV, 64)
