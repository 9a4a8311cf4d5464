"""Conversations -> token ids and next-token labels, with the loss only on assistant turns.

What starts a sequence (one rule for every stage):

- Pretraining shards (`lmforge.tokenizer.pack`) hold each document as `text + eos`, so every document but the
  very first follows an eos: eos is the document separator the model learns. A tokenizer whose own
  post-processor puts tokens before a text (Llama's bos) gets those before each document as well
  (`Tokenizer.declared_start`), except a lone eos, which the previous document already wrote.
- Plain text the model reads from its start (`lmforge generate --prompt`, completions in `lmforge serve`, plain
  eval tasks) is `Tokenizer.sequence_start + encode(text)`: the declared prefix, else eos, i.e. a document
  start as the shards show it.
- A conversation (SFT, DPO, rollouts, `lmforge chat`, chat completions in `lmforge serve`, chat eval tasks) is
  exactly what the chat template renders, tokenized as a whole; nothing is added outside it. lmforge's default
  template begins with `{{ eos_token }}` (the separator above); Llama 3 and Mistral templates begin with
  `{{ bos_token }}`. So `AutoTokenizer.apply_chat_template(tokenize=True)` on an exported tokenizer gives the
  same ids, and a template that writes bos gets it once.
- An assistant turn ends at the first token the template writes after its content (`stop_token_ids`: e.g.
  `<|end|>`, `<|eot_id|>`, `<|im_end|>`) or at eos; `lmforge convert to-hf` lists both as the
  `eos_token_id` of `generation_config.json`, so HF `generate` stops where lmforge does.

Text a user types is text: a control token (a special added token such as `<|end|>`) inside a message is
encoded as plain characters, so only the tokens the template itself writes become control ids. (This is
transformers' `apply_chat_template(..., sanitize_control_tokens=True)`; the ids are equal to transformers'
either way when no message holds a control token.)

Which tokens the assistant wrote: a template's `{% generation %}` blocks (as transformers' assistant masks use
them; lmforge's built-in templates have them), or else the texts of growing prefixes of the conversation,
which must each begin the next ("incremental" templates). SFT trains on a conversation whose template is
neither one example per assistant turn (`encode_turns`). Prompts and stop tokens need neither, so generation
and serving work with any template.

Labels follow the project's convention (`causal_lm_loss`, `sequence_logps`): they are already
shifted, `labels[t]` is the target for position t (the token at t+1), or IGNORE_INDEX where no loss.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lmforge.core.errors import LmforgeError
from lmforge.core.tensors import IGNORE_INDEX
from lmforge.data.formats import Message
from lmforge.tokenizer import GENERATION_END, GENERATION_START, GIL_FREE_CHARS, Tokenizer

# Private-use characters around a control token found in a message while the template renders.
TEXT_START, TEXT_END = "\U000f0000", "\U000f0001"
_MARKERS = (TEXT_START, TEXT_END, GENERATION_START, GENERATION_END)


class TemplateNotIncremental(LmforgeError):
    """The assistant tokens of a conversation cannot be located (no `{% generation %}` blocks, and rendering more
    messages changes the text of earlier ones)."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # next-token targets aligned with input_ids; IGNORE_INDEX where no loss
    truncated: bool = False  # the conversation was cut to max_len tokens

    @property
    def n_loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def render_chat(tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool,
                tools: list[dict] | None = None) -> str:
    """The conversation as the template renders it, with each control token a message holds marked as text
    and `{% generation %}` blocks marked (`_encode_marked` reads and removes the marks); `tools` (OpenAI function
    specs) go to templates that render them."""
    return tokenizer.render_marked(_mark_messages(tokenizer, messages), add_generation_prompt, tools)


def _mark_messages(tokenizer: Tokenizer, messages: Sequence[Message]) -> list[dict[str, Any]]:
    control = tokenizer.control_pattern

    def mark(value: Any) -> Any:
        if isinstance(value, str):
            for marker in _MARKERS:  # a marker typed by the user could forge one of ours
                value = value.replace(marker, "")
            return control.sub(lambda m: TEXT_START + m.group(0) + TEXT_END, value) if control else value
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mark(v) for v in value]
        return value

    return [{k: v if k == "role" else mark(v) for k, v in m.items()} if isinstance(m, dict) else m
            for m in messages]


def _encode_marked(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[bool]]:
    """Token ids of a marked rendering, and for each whether it overlaps a `{% generation %}` span.

    The text is cut only where a message held a control token: the pieces the template wrote are encoded with
    control tokens recognized, each marked token from a message as plain characters. A piece after the first
    is encoded after a newline that is then dropped (where the newline stays a token of its own), as
    transformers does, so tokenizers that treat a string's start specially (SentencePiece's leading space)
    read it as running text.
    """
    segments, spans = _segments(tokenizer, text)
    newline = tokenizer.tk.encode("\n", add_special_tokens=False).ids if len(segments) > 1 else []
    ids: list[int] = []
    mask: list[bool] = []
    for start, piece, plain in segments:
        tk = tokenizer.plain_tk if plain else tokenizer.tk
        enc, shift = _encode(tk, piece), 0
        if start > 0:
            after = _encode(tk, "\n" + piece)
            if after.ids[:len(newline)] == newline:
                enc, shift = after, 1
        for token, (a, b) in list(zip(enc.ids, enc.offsets))[len(newline) if shift else 0:]:
            a, b = start + a - shift, start + b - shift
            ids.append(token)
            mask.append(any(a < end and b > begin for begin, end in spans))
    return ids, mask


def _encode(tk: Any, text: str) -> Any:
    """One `tokenizers` Encoding (ids and offsets); a long text through the batch path, which releases the GIL
    (as `Tokenizer.encode` does), so a server thread tokenizing a long chat leaves its event loop free."""
    if len(text) > GIL_FREE_CHARS:
        return tk.encode_batch([text], add_special_tokens=False)[0]
    return tk.encode(text, add_special_tokens=False)


def _segments(tokenizer: Tokenizer, text: str) -> tuple[list[tuple[int, str, bool]], list[tuple[int, int]]]:
    """(start, text, is a marked token) pieces of the rendering with the marks removed, and the generation
    spans, both in characters of that unmarked text."""
    control = tokenizer.control_pattern
    token = f"{TEXT_START}(?:{control.pattern}){TEXT_END}|" if control else ""
    segments: list[tuple[int, str, bool]] = []
    spans: list[tuple[int, int]] = []
    buffer, at, size = "", 0, 0  # pending template text, where it starts, unmarked characters so far

    def flush() -> None:
        nonlocal buffer
        if buffer:
            segments.append((at, buffer, False))
        buffer = ""

    last = 0
    for m in re.finditer(f"{token}[{''.join(_MARKERS)}]", text):
        if not buffer:
            at = size
        buffer += text[last:m.start()]
        size += m.start() - last
        last = m.end()
        mark = m.group(0)
        if mark == GENERATION_START:
            spans.append((size, size))
        elif mark == GENERATION_END:
            if spans:
                spans[-1] = (spans[-1][0], size)
        else:  # a marked control token is plain text; a lone mark (a template cut one up) only separates
            flush()
            if len(mark) > 1:
                segments.append((size, mark[1:-1], True))
                size += len(mark) - 2
    if not buffer:
        at = size
    buffer += text[last:]
    flush()
    return segments, spans


def _with_spans(tokenizer: Tokenizer, messages: list[Message], loss_on: str) -> str:
    """The marked rendering of `messages` with the assistant turns that carry the loss between generation marks:
    the template's own `{% generation %}` blocks, else spans found by rendering prefixes."""
    full = render_chat(tokenizer, messages, add_generation_prompt=False)
    if GENERATION_START in full:
        if loss_on == "last":  # keep only the final block's marks
            cut = full.rindex(GENERATION_START)
            full = full[:cut].replace(GENERATION_START, "").replace(GENERATION_END, "") + full[cut:]
        return full
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if loss_on == "last":
        turns = turns[-1:]
    spans = []
    for i in turns:
        head = _prefix_render(tokenizer, messages[:i], True)
        upto = _prefix_render(tokenizer, messages[:i + 1], False)
        if not (upto.startswith(head) and full.startswith(upto)):
            raise TemplateNotIncremental(
                "the tokenizer's chat template is not incremental (rendering more messages changes the text of "
                "earlier ones) and has no {% generation %} blocks, so assistant tokens cannot be located for the "
                "loss mask")
        spans.append((len(head), len(upto)))
    for start, end in reversed(spans):
        full = full[:start] + GENERATION_START + full[start:end] + GENERATION_END + full[end:]
    return full


def _prefix_render(tokenizer: Tokenizer, messages: list[Message], add_generation_prompt: bool) -> str:
    try:
        return render_chat(tokenizer, messages, add_generation_prompt)
    except LmforgeError as e:  # e.g. a template that reads messages[0] cannot render an empty conversation
        raise TemplateNotIncremental(f"{e} (while rendering the first {len(messages)} messages to locate the "
                                     "assistant tokens for the loss mask)") from None


def _shifted(ids: list[int], mask: list[bool], max_len: int) -> Encoded:
    if max_len < 1:
        raise LmforgeError(f"max_len must be >= 1, got {max_len}")
    truncated = len(ids) - 1 > max_len
    ids, mask = ids[:max_len + 1], mask[:max_len + 1]
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
    return Encoded(ids[:-1], labels, truncated)


def chat_ids(tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False,
             tools: list[dict] | None = None) -> list[int]:
    """The conversation's token ids, as `AutoTokenizer.apply_chat_template(tokenize=True)` gives them."""
    return _encode_marked(tokenizer, render_chat(tokenizer, messages, add_generation_prompt, tools))[0]


def encode_conversation(tokenizer: Tokenizer, messages: list[Message], max_len: int) -> Encoded:
    """Inputs and labels of a (multi-turn) conversation; the loss covers every assistant turn. Raises
    TemplateNotIncremental where the turns cannot be located (`encode_turns` works for those templates)."""
    return _shifted(*_encode_marked(tokenizer, _with_spans(tokenizer, list(messages), "all")), max_len)


def encode_turns(tokenizer: Tokenizer, messages: list[Message], max_len: int) -> list[Encoded]:
    """One example per assistant turn: the conversation up to it, the loss on it alone. The texts are what the
    template renders at each point, so this works for templates that rewrite earlier turns (a system message
    moved into the last user turn, reasoning dropped from earlier replies)."""
    return [_shifted(*_encode_marked(tokenizer, _with_spans(tokenizer, list(messages[:i + 1]), "last")), max_len)
            for i, m in enumerate(messages) if m.get("role") == "assistant"]


def encode_prompt_response(tokenizer: Tokenizer, prompt: list[Message], response: str, max_len: int) -> Encoded:
    """`prompt` followed by one assistant `response`; the loss (and `sequence_logps`) covers only it."""
    messages = [*prompt, {"role": "assistant", "content": response}]
    return _shifted(*_encode_marked(tokenizer, _with_spans(tokenizer, messages, "last")), max_len)


def prompt_ids(tokenizer: Tokenizer, prompt: list[Message], tools: list[dict] | None = None) -> list[int]:
    """The tokens a sampler starts from: the prompt plus the opening of an assistant turn (`tools`: OpenAI
    function specs for templates that render them)."""
    return chat_ids(tokenizer, prompt, add_generation_prompt=True, tools=tools)


def stop_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Tokens that end an assistant turn: the control token the template writes right after a reply's content
    (e.g. <|end|>), if any, and eos. Any template works; one that cannot render a user/assistant exchange
    stops at eos only."""
    probe = "lmforge probe reply"
    stops: list[int] = []
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": probe}], add_generation_prompt=False)
    except LmforgeError:
        text = ""
    if probe in text:
        after = tokenizer.encode(text[text.rindex(probe) + len(probe):])
        special = {t.content for t in tokenizer.tk.get_added_tokens_decoder().values() if t.special}
        stops = [t for t in after[:1] if tokenizer.tk.id_to_token(t) in special]
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
