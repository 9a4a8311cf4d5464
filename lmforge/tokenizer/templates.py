"""Built-in chat templates for the families `lmforge convert from-hf` imports, used when a checkpoint ships none.

Each renders a plain system/user/assistant conversation exactly as the family's official template does; the
family is recognized by its control tokens in the vocabulary (`builtin_template`). Assistant replies sit in
`{% generation %}` blocks (transformers' mark for the tokens a model writes), so SFT masks them without
rendering prefixes; the blocks add no text.
"""

from __future__ import annotations

from typing import Any

# ChatML as Qwen2-Instruct uses it: "<|im_start|>role\ncontent<|im_end|>\n" per message, and a default system
# message when the conversation has none.
QWEN2_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] != 'system' -%}"
    "{%- set turns = [{'role': 'system', 'content': 'You are a helpful assistant.'}] + messages -%}"
    "{%- else -%}"
    "{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- for m in turns -%}"
    "{{- '<|im_start|>' ~ m['role'] ~ '\\n' -}}"
    "{%- if m['role'] == 'assistant' -%}"
    "{%- generation -%}{{- m['content'] ~ '<|im_end|>\\n' -}}{%- endgeneration -%}"
    "{%- else -%}{{- m['content'] ~ '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Llama 3 Instruct: bos (with the first message), then per message a role header, a blank line, the trimmed
# content and <|eot_id|>.
LLAMA3_CHAT_TEMPLATE = (
    "{%- if messages -%}{{- bos_token -}}{%- endif -%}"
    "{%- for m in messages -%}"
    "{{- '<|start_header_id|>' ~ m['role'] ~ '<|end_header_id|>\\n\\n' -}}"
    "{%- if m['role'] == 'assistant' -%}"
    "{%- generation -%}{{- m['content'] | trim ~ '<|eot_id|>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- m['content'] | trim ~ '<|eot_id|>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

# Mistral Instruct: bos, "[INST] user [/INST]", the reply and eos; roles alternate user/assistant after an
# optional system message, which opens the first user turn followed by a blank line.
MISTRAL_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for m in turns -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('roles must alternate user/assistant after an optional system message') -}}"
    "{%- endif -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- set text = (system ~ '\\n\\n' ~ m['content']) if loop.first and system is not none else m['content'] -%}"
    "{{- ' [INST] ' ~ text ~ ' [/INST]' -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{- ' ' -}}{%- generation -%}{{- m['content'] ~ eos_token -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- raise_exception('roles are system (first only), user and assistant') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# (a control token only that family's vocabulary has, its template)
FAMILY_TEMPLATES = (
    ("<|im_start|>", QWEN2_CHAT_TEMPLATE),
    ("<|start_header_id|>", LLAMA3_CHAT_TEMPLATE),
    ("[INST]", MISTRAL_CHAT_TEMPLATE),
)


def builtin_template(tk: Any) -> str | None:
    """The built-in template of the family whose control tokens `tk` (a `tokenizers.Tokenizer`) has, or None."""
    return next((template for token, template in FAMILY_TEMPLATES if tk.token_to_id(token) is not None), None)
