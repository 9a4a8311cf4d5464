"""Single-sequence sampling with a KV cache: prefill the prompt once, then decode one token at a time.

The prompt's keys and values are computed in one forward pass and kept in a preallocated
`KVCache`; every later step feeds only the newest token at `start_pos` = tokens so far, so a
step costs O(length) attention instead of re-running the whole sequence.

Stop tokens end generation and are NOT yielded (unlike HF `generate`, which appends eos to its
output): callers get exactly the text the model produced. The whole sequence (prompt + new
tokens) never exceeds the model's `max_seq_len`.

`compile=True` opts into the static-shape step of `lmforge.generate.static` (CUDA graphs on CUDA, inductor's
C++ kernels on CPU), the same tokens with far less per-token overhead; models it does not support decode the normal way.
Callers go through `lmforge.generate.engine.generate`, which picks this loop for the "sample" strategy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lmforge.generate.processors import History
from lmforge.generate.prompt import check_prompt, fit_prompt, prefill_kwargs
from lmforge.generate.sampling import SamplingParams, new_generator, sample_next
from lmforge.generate.static import static_decoder, static_supported

log = logging.getLogger(__name__)


def sample_stream(model: nn.Module, prompt_ids: Sequence[int], params: SamplingParams, *,
                  compile: bool = False) -> Iterator[int]:
    """Yield new token ids one at a time, as soon as each is sampled.

    Stops on a stop token (not yielded), after `params.max_new_tokens`, or when the sequence
    reaches the model's `max_seq_len`. The prompt is checked (and cut) now, before the first
    token is asked for, so a bad prompt fails where the stream is created. The model runs in
    eval mode (no dropout) while generating. `compile`: decode with the static-shape step
    (`lmforge.generate.static`), compiled; the first call compiles (seconds), later ones reuse it.
    """
    check_prompt(prompt_ids, model.cfg.vocab_size)
    if params.max_new_tokens == 0:
        return iter(())
    prompt = fit_prompt(prompt_ids, model.context_length)
    if compile:
        reason = static_supported(model)
        if reason is None:
            return decode_static(model, prompt, params, compile=True)
        log.warning("generate: compiled decoding is off for this model (%s); decoding eagerly", reason)
    return decode(model, prompt, params)


def decode_budget(model: nn.Module, prompt: list[int], params: SamplingParams) -> int:
    return min(params.max_new_tokens, model.context_length - len(prompt))


@torch.no_grad()
def decode(model: nn.Module, prompt: list[int], params: SamplingParams) -> Iterator[int]:
    """Prefill `prompt` (which leaves room for a token) into a fresh cache, then decode step by step."""
    budget = decode_budget(model, prompt, params)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        # The last sampled token is never fed back, so the cache needs one slot less than the total.
        cache = model.new_cache(1, len(prompt) + budget - 1)
        logits = model(torch.tensor([prompt], device=device), cache=cache, start_pos=0,
                       **prefill_kwargs(model, 1, len(prompt), device))[:, -1]
        pos = len(prompt)

        def step(token: torch.Tensor) -> torch.Tensor:
            nonlocal pos
            pos += 1
            return model(token.view(1, 1), cache=cache, start_pos=pos - 1)[:, -1]

        yield from sample_loop(logits, step, prompt, budget, params, device)
    finally:
        model.train(was_training)


@torch.no_grad()
def decode_static(model: nn.Module, prompt: list[int], params: SamplingParams, compile: bool = True
                  ) -> Iterator[int]:
    """`decode` through the model's `StaticDecoder`: same prefill, then fixed-shape steps (compiled when
    `compile`; CUDA graphs on CUDA). Position and token stay on the device between steps. The decoder's
    cache is one per model: a stream started while another is running on it decodes the normal way."""
    dec = static_decoder(model, compile)
    if dec.in_use:
        yield from decode(model, prompt, params)
        return
    budget = decode_budget(model, prompt, params)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    dec.in_use = True
    try:
        graphs = compile and device.type == "cuda"
        logits = dec.prefill(torch.tensor([prompt], device=device))
        pos = torch.tensor([len(prompt)], device=device)

        n = len(prompt)  # the position on the host too: it picks the slots a CPU step attends over

        def step(token: torch.Tensor) -> torch.Tensor:
            nonlocal n
            if graphs:  # the previous step's outputs are consumed: let the graph reuse its memory
                torch.compiler.cudagraph_mark_step_begin()
            out = dec.step(token.view(1, 1), pos, dec.window_for(n))
            pos.add_(1)
            n += 1
            return out

        yield from sample_loop(logits, step, prompt, budget, params, device)
    finally:
        dec.in_use = False
        model.train(was_training)


def sample_loop(logits: torch.Tensor, step, prompt: list[int], budget: int, params: SamplingParams,
                device: torch.device) -> Iterator[int]:
    """Sample from `logits`, yield, feed the token to `step` (-> next logits), until a stop token or `budget`."""
    generator = new_generator(params.seed, device)
    stop = set(params.stop_token_ids)
    seq = list(prompt)  # read only by history-dependent processors (penalties, n-gram ban)
    for i in range(budget):
        history = History.of([seq], len(prompt), device) if params.needs_history else None
        next_token = sample_next(logits, params, generator, history)
        token = int(next_token[0])
        if token in stop:
            return
        yield token
        seq.append(token)
        if i + 1 == budget:
            return
        logits = step(next_token)
