"""The one generation entry: `generate(model, ids, strategy)`, used by generate, chat, eval and the quickstart.

A `Strategy` names how to decode (plain sampling/greedy, beam search, contrastive search or speculative
decoding) with that kind's options, and holds the `SamplingParams` every kind reads its length, seed and
stop tokens from. `generate_stream` dispatches to the strategy's decode loop and yields tokens as they
are decided; `generate` collects them, for one prompt or for a batch of prompts (batched sampling decodes
the whole batch at once through `lmforge.generate.batch`). A bare `SamplingParams` means plain sampling.

Every architecture the project trains goes through the same loops: a decoder-only model as it is (a prefix
LM prefills its prompt bidirectionally, `lmforge.generate.prompt.prefill_kwargs`); an encoder-decoder
encodes the prompt as its source once (`EncoderDecoder.bind`) and its decoder, started from
`decoder_start_id`, is decoded like a decoder-only model. Speculative decoding is for causal decoders only.

The server keeps its own loop (`lmforge.serve.scheduler`): continuous batching admits and retires
requests between steps, which no single call can do; it shares the sampling step and its settings.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, overload

import torch
from torch import nn

from lmforge.core.errors import LmforgeError
from lmforge.generate.batch import generate_batch
from lmforge.generate.beam import BeamParams, beam_search
from lmforge.generate.contrastive import contrastive_stream
from lmforge.generate.decode import sample_stream
from lmforge.generate.prompt import check_prompt, fit_prompt
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.speculative import DraftModel, MTPDrafter, SpecStats, check_draft, speculative_stream
from lmforge.model.encdec import EncoderDecoder

Kind = Literal["sample", "beam", "contrastive", "speculative"]
CONTRASTIVE_TOP_K = 4  # contrastive candidates when sampling.top_k is 0


@dataclass
class Strategy:
    """How to decode: `kind` plus the options of that kind; the others are ignored."""

    kind: Kind = "sample"
    sampling: SamplingParams = field(default_factory=SamplingParams)
    compile: bool = False  # sample: the static-shape step, compiled (CUDA graphs on CUDA, inductor on CPU)
    num_beams: int = 4  # beam: width
    length_penalty: float = 1.0  # beam: score = sum log-probs / length ** length_penalty
    early_stopping: bool | Literal["never"] = False  # beam: HF's stopping rule
    penalty_alpha: float = 0.6  # contrastive: degeneration penalty (candidates: sampling.top_k, else 4)
    draft: nn.Module | Literal["mtp"] = "mtp"  # speculative: a draft model, or the target's own MTP heads
    num_draft_tokens: int = 4  # speculative: tokens drafted per round


@dataclass
class RunStats:
    """What a run reports besides its tokens: the beam's score, speculative decoding's acceptance counts."""

    score: float | None = None
    speculative: SpecStats = field(default_factory=SpecStats)


def as_strategy(strategy: Strategy | SamplingParams) -> Strategy:
    return strategy if isinstance(strategy, Strategy) else Strategy(sampling=strategy)


def generate_stream(model: nn.Module, prompt_ids: Sequence[int], strategy: Strategy | SamplingParams,
                    stats: RunStats | None = None) -> Iterator[int]:
    """Yield the new tokens of one prompt (stop tokens are not yielded); `stats`, if given, is filled in.

    The prompt is checked when the stream is created. Beam search decides its tokens all at once (the
    best hypothesis is known only at the end), so its stream is ready when this returns."""
    s = as_strategy(strategy)
    stats = stats if stats is not None else RunStats()
    params = s.sampling
    if s.kind == "speculative" and (isinstance(model, EncoderDecoder) or model.cfg.prefix_lm):
        raise LmforgeError("speculative decoding needs a causal decoder-only model; this one is "
                           + ("an encoder-decoder" if isinstance(model, EncoderDecoder) else "a prefix LM"))
    if isinstance(model, EncoderDecoder):
        model, prompt_ids = bind_sources(model, [prompt_ids])
        prompt_ids = prompt_ids[0]
    if s.kind == "beam":
        beam = BeamParams(num_beams=s.num_beams, length_penalty=s.length_penalty, early_stopping=s.early_stopping,
                          no_repeat_ngram_size=params.no_repeat_ngram_size,
                          max_new_tokens=max(1, params.max_new_tokens), stop_token_ids=params.stop_token_ids)
        best = beam_search(model, prompt_ids, beam)[0]
        stats.score = best.score
        return iter(best.tokens)
    if s.kind == "contrastive":
        return contrastive_stream(model, prompt_ids, s.penalty_alpha, params.top_k or CONTRASTIVE_TOP_K,
                                  params.max_new_tokens, params.stop_token_ids)
    if s.kind == "speculative":
        if s.draft == "mtp":
            drafter = MTPDrafter(model)
        else:
            check_draft(model, s.draft)
            drafter = DraftModel(s.draft.eval(), min(s.draft.context_length, model.context_length))
        return speculative_stream(model, drafter, prompt_ids, params, s.num_draft_tokens, stats.speculative)
    return sample_stream(model, prompt_ids, params, compile=s.compile)


@overload
def generate(model: nn.Module, prompt_ids: Sequence[int], strategy: Strategy | SamplingParams) -> list[int]: ...


@overload
def generate(model: nn.Module, prompt_ids: Sequence[Sequence[int]],
             strategy: Strategy | SamplingParams) -> list[list[int]]: ...


def generate(model: nn.Module, prompt_ids: Sequence[int] | Sequence[Sequence[int]],
             strategy: Strategy | SamplingParams) -> list[int] | list[list[int]]:
    """The new token ids only (the prompt is not repeated); see `generate_stream`.

    A list of prompts gives a list of answers. Plain sampling decodes them as one left-padded batch
    (greedy answers equal the one-by-one ones; a seed then draws for the whole batch); other strategies
    decode them one by one."""
    s = as_strategy(strategy)
    if prompt_ids and isinstance(prompt_ids[0], (list, tuple)):
        if s.kind == "sample" and not s.compile:
            prompts = [list(p) for p in prompt_ids]
            if isinstance(model, EncoderDecoder):
                model, prompts = bind_sources(model, prompts)
            return generate_batch(model, prompts, s.sampling)
        return [list(generate_stream(model, p, s)) for p in prompt_ids]
    return list(generate_stream(model, prompt_ids, s))


def bind_sources(model: EncoderDecoder, prompts: Sequence[Sequence[int]]) -> tuple[nn.Module, list[list[int]]]:
    """An encoder-decoder's prompts as its sources, encoded once (right-padded, masked): the decoder bound to
    them, and each row's decoder prompt, `decoder_start_id`. A source too long keeps its last tokens."""
    sources = []
    for p in prompts:
        check_prompt(p, model.cfg.vocab_size)
        sources.append(fit_prompt(p, model.cfg.max_seq_len))
    device = next(model.parameters()).device
    width = max(len(p) for p in sources)
    ids = torch.tensor([p + [0] * (width - len(p)) for p in sources], device=device)
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in sources], device=device)
    bound = model.bind(ids, None if bool(mask.all()) else mask)
    return bound, [[model.cfg.decoder_start_id]] * len(sources)
