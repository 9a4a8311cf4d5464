"""A prefix LM is trained on chats the way generate and serve read them: SFT's (and DPO's) forward pass reads each
conversation's prompt as the model's bidirectional prefix, packed or not; the loss equals the one computed with
the prompt-as-prefix model call (`prefix_len` = the prompt generate would feed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tinymodels import debug_model, text_tokenizer

from lmforge.core.tensors import IGNORE_INDEX
from lmforge.posttrain.dpo import pair_logps
from lmforge.posttrain.losses import sequence_logps
from lmforge.posttrain.sft import collate_packed, sft_loss
from lmforge.tokenizer.chat import encode_conversation, pad_batch, prompt_ids

CHATS = [[{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}],
         [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Blue, like the sea."}],
         [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend."}]]


def setup(prefix_lm: bool = True):
    tok = text_tokenizer()
    model = debug_model(tok.vocab_size, seed=2, prefix_lm=prefix_lm)
    return model, tok, [encode_conversation(tok, chat, 96) for chat in CHATS]


def reference_loss(model, tok, encoded) -> torch.Tensor:
    """Token-mean cross-entropy over the answers, each conversation run alone with its prompt as the prefix."""
    total, count = 0.0, 0
    for chat, e in zip(CHATS, encoded):
        prefix = len(prompt_ids(tok, chat[:-1]))  # what generate prefills bidirectionally
        assert e.labels[prefix - 1] != IGNORE_INDEX and set(e.labels[:prefix - 1]) == {IGNORE_INDEX}
        logits = model(torch.tensor([e.input_ids]), prefix_len=torch.tensor([prefix]))[0]
        total = total + F.cross_entropy(logits.float(), torch.tensor(e.labels), reduction="sum")
        count += sum(t != IGNORE_INDEX for t in e.labels)
    return total / count


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_prefix_lm_sft_loss_reads_the_prompt_as_the_prefix(packed, fused):
    model, tok, encoded = setup()
    if packed:
        batch = collate_packed([encoded], 0)
    else:
        inputs, labels = pad_batch(encoded, 0)
        batch = {"input_ids": inputs, "labels": labels}
    with torch.no_grad():
        want = reference_loss(model, tok, encoded)
        got, _ = sft_loss(model, batch, fused)
        causal, _ = sft_loss(setup(prefix_lm=False)[0], batch, fused)  # the same weights read causally
    assert float(got) == pytest.approx(float(want), abs=1e-5)
    assert abs(float(causal) - float(want)) > 1e-3


def test_prefix_lm_dpo_log_probs_read_the_prompt_as_the_prefix():
    model, tok, encoded = setup()
    inputs, labels = pad_batch(encoded[:2], 0)  # as collate_pairs: chosen rows, then rejected rows
    with torch.no_grad():
        chosen, rejected = pair_logps(model, inputs, labels)
        want = []
        for chat, e in zip(CHATS[:2], encoded[:2]):
            prefix = torch.tensor([len(prompt_ids(tok, chat[:-1]))])
            want.append(sequence_logps(model(torch.tensor([e.input_ids]), prefix_len=prefix),
                                       torch.tensor([e.labels]))[0])
    assert [float(chosen[0]), float(rejected[0])] == pytest.approx([float(w) for w in want], abs=1e-4)
