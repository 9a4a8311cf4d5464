"""Conversations -> token ids and next-token labels, with the loss only on assistant turns.

The tokenizer's chat template renders the conversation; the rendered text is cut into segments
(each message, and each assistant turn's header apart from its content) by rendering growing
prefixes of the conversation, and each segment is encoded on its own. So the labels know which
tokens the assistant wrote, whatever the template looks like, and `prompt_ids` (the tokens a
sampler starts from) are exactly the tokens that precede the response in training.

Labels follow the project's convention (`causal_lm_loss`, `sequence_logps`): they are already
shifted, `labels[t]` is the target for position t (the token at t+1), or IGNORE_INDEX where no loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lmforge.core.errors import LmforgeError
from lmforge.core.tensors import IGNORE_INDEX
from lmforge.data.formats import Message
from lmforge.tokenizer import Tokenizer


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # next-token targets aligned with input_ids; IGNORE_INDEX where no loss
    truncated: bool = False  # the conversation was cut to max_len tokens

    @property
    def n_loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def chat_segments(tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False,
                  loss_on: str = "all", tools: list[dict] | None = None) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, has_loss) pieces; assistant contents (with their end marker)
    carry the loss. `loss_on="last"` keeps it only on the final assistant turn."""
    messages = list(messages)
    last_assistant = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=-1)
    segments: list[tuple[str, bool]] = []
    done = render_chat(tokenizer, [], add_generation_prompt=False, tools=tools) if messages else ""
    if done:
        segments.append((done, False))
    for i, message in enumerate(messages):
        if message.get("role") == "assistant":
            header = _extend(tokenizer, messages[:i], True, done, tools)
            segments.append((header[len(done):], False))
            done = header
        text = _extend(tokenizer, messages[:i + 1], False, done, tools)
        loss = message.get("role") == "assistant" and (loss_on == "all" or i == last_assistant)
        segments.append((text[len(done):], loss))
        done = text
    if add_generation_prompt:
        text = _extend(tokenizer, messages, True, done, tools)
        segments.append((text[len(done):], False))
    return [(text, loss) for text, loss in segments if text]


def render_chat(tokenizer: Tokenizer, messages: list[Message], add_generation_prompt: bool,
                tools: list[dict] | None = None) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)


def _extend(tokenizer: Tokenizer, messages: list[Message], add_generation_prompt: bool, prefix: str,
            tools: list[dict] | None = None) -> str:
    text = render_chat(tokenizer, messages, add_generation_prompt, tools)
    if not text.startswith(prefix):
        raise LmforgeError("the tokenizer's chat template is not incremental (rendering more messages changes "
                           "the text of earlier ones), so assistant tokens cannot be located for the loss mask")
    return text


def _tokens(tokenizer: Tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    ids: list[int] = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    mask = [False] * len(ids)
    for text, loss in segments:
        piece = tokenizer.encode(text)
        ids += piece
        mask += [loss] * len(piece)
    return ids, mask


def _shifted(ids: list[int], mask: list[bool], max_len: int) -> Encoded:
    if max_len < 1:
        raise LmforgeError(f"max_len must be >= 1, got {max_len}")
    truncated = len(ids) - 1 > max_len
    ids, mask = ids[:max_len + 1], mask[:max_len + 1]
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
    return Encoded(ids[:-1], labels, truncated)


def encode_conversation(tokenizer: Tokenizer, messages: list[Message], max_len: int) -> Encoded:
    """Inputs and labels of a (multi-turn) conversation; the loss covers every assistant turn."""
    return _shifted(*_tokens(tokenizer, chat_segments(tokenizer, messages)), max_len)


def encode_prompt_response(tokenizer: Tokenizer, prompt: list[Message], response: str, max_len: int) -> Encoded:
    """`prompt` followed by one assistant `response`; the loss (and `sequence_logps`) covers only it."""
    messages = [*prompt, {"role": "assistant", "content": response}]
    return _shifted(*_tokens(tokenizer, chat_segments(tokenizer, messages, loss_on="last")), max_len)


def prompt_ids(tokenizer: Tokenizer, prompt: list[Message], tools: list[dict] | None = None) -> list[int]:
    """The tokens a sampler starts from: the prompt plus the opening of an assistant turn (`tools`: OpenAI
    function specs for templates that render them)."""
    return _tokens(tokenizer, chat_segments(tokenizer, prompt, add_generation_prompt=True, tools=tools))[0]


def stop_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Tokens that end an assistant turn: the first token after its content (e.g. <|end|>), and eos."""
    probe = "x"
    _, turn = chat_segments(tokenizer, [{"role": "user", "content": probe}, {"role": "assistant", "content": probe}],
                            loss_on="last")[-2:]
    ids = tokenizer.encode(turn[0][len(probe):]) if turn[0].startswith(probe) else []
    stops = ids[:1]
    if tokenizer.eos_id is not None and tokenizer.eos_id not in stops:
        stops.append(tokenizer.eos_id)
    return stops


def pad_batch(encoded: Sequence[Encoded], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded [B, T] inputs (pad_id) and labels (IGNORE_INDEX), T = the longest sequence."""
    if not encoded:
        raise ValueError("pad_batch needs at least one sequence")
    width = max(len(e.input_ids) for e in encoded)
    inputs = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(encoded):
        inputs[row, :len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[row, :len(e.labels)] = torch.tensor(e.labels, dtype=torch.long)
    return inputs, labels
