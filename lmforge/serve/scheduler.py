"""Continuous batching: one background thread runs the model; requests join and leave between steps.

Static batching waits for a whole batch to finish, so short answers idle behind long ones. Here
(Orca, Yu et al. 2022, "iteration-level scheduling") the loop repeats one iteration:

1. drop requests whose client went away (their slot is free at once);
2. admit waiting requests while cache rows are free; a request whose prompt starts with blocks the
   prefix cache holds (`cache.PrefixCache`: a shared system prompt, few-shot examples, earlier turns)
   copies their keys and values into its row and only prefills the rest;
3. one prefill pass: the prompts still being prefilled go through the model together, each from its
   own slot, up to `prefill_chunk` tokens in all (0: whole prompts). A long prompt is prefilled a chunk
   per iteration, between decode steps, so the running streams keep flowing while it loads (Sarathi's
   chunked prefill, Agrawal et al. 2023). A prompt whose last token ran samples its first token, and its
   full blocks go into the prefix cache;
4. one decode step for every request past its prompt: each feeds its last token at its own position
   (per-row positions and a per-row key mask, `lmforge.serve.cache`), then samples;
5. finished requests (stop token, stop string, max_tokens, context full) leave.

A request's rows see exactly what they would see alone (same positions, same keys), so greedy
output does not depend on what else is running, on the prefix cache or on the chunk size (tested).
With LoRA adapters loaded (`lmforge serve --adapter name=DIR`), each request names its adapter and one
forward pass serves rows of different adapters (`lmforge.peft.lora.set_row_adapters`); prefix-cache
blocks are kept per adapter. Each request samples with its own
generator, so a seed reproduces a request whatever it was batched with, and applies its own
`logit_bias` and penalties (which read the tokens it generated). A job that asks for logprobs gets,
with every token, its log-probability under the model's distribution (the raw logits, before bias,
penalties and temperature, as vLLM reports them) and the most likely alternatives; `echo_logprobs`
scores the prompt's tokens too, from the prefill's logits (such a prompt is prefilled whole, never
from the prefix cache). Errors stay local: an
exception while sampling one request fails that request only; an exception in a shared prefill or
decode step fails the requests in that step, and the loop goes on.

Every architecture the project trains is served, read as `lmforge.generate` reads it:

- a prefix LM (`model.prefix_lm`) prefills each prompt whole, bidirectionally within itself (the same
  `prefix_len` forward as `lmforge.generate.prompt.prefill_kwargs`), and decodes causally after it. Its
  prompts are never chunked (a later prompt token changes the keys and values of earlier ones) and never
  served from the prefix cache (a block's keys and values depend on the whole prompt, not on the tokens
  up to it): prefix caching is off for it;
- an encoder-decoder (`model.arch=encdec`) encodes a request's prompt as its source once, at admission,
  and keeps its cross-attention keys and values in the request's slot (`cache.SourceCache`); its decoder
  starts from `decoder_start_id` and is decoded like a decoder-only model, rows with sources of different
  lengths in one pass (padded, masked). Prefix caching is off for it (the decoder's prompt is one token).

A job with a thinking budget (`serve.reasoning.ThinkBudget`) has the tokens of `</think>` fed in place of
sampled ones once its thinking has used the budget.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lmforge.core.errors import LmforgeError
from lmforge.generate.processors import History
from lmforge.generate.prompt import prefill_kwargs
from lmforge.generate.sampling import SamplingParams, new_generator, sample_next
from lmforge.generate.stops import StopMatcher
from lmforge.model.encdec import EncoderDecoder, SourceBound
from lmforge.peft.lora import lora_layers, set_row_adapters
from lmforge.serve.cache import BLOCK, PrefixCache, SlotCache, SourceCache, extend_mask
from lmforge.serve.grammar import Constraint
from lmforge.serve.reasoning import ThinkBudget
from lmforge.tokenizer import StreamDecoder, Tokenizer

log = logging.getLogger(__name__)


@dataclass
class TokenLogprob:
    """One token's log-probability and the `top` most likely tokens at its position, most likely first.
    The first token of a prompt has no logprob (nothing precedes it)."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Delta:
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the tokens this text came from (if asked)


@dataclass
class PromptLogprobs:
    """Sent once, right after prefill, to a job with `echo_logprobs`: one entry per prompt token."""

    entries: list[TokenLogprob]


@dataclass
class Done:
    finish_reason: str  # "stop" (stop token or string) or "length" (max_tokens or the context is full)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str


Event = Delta | PromptLogprobs | Done | Failed


class SchedulerBusy(LmforgeError):
    """More requests in flight than `max_concurrent` allows."""


@dataclass
class Job:
    """One request: a prompt, how to sample it, and where its events go (called from the loop thread)."""

    prompt: list[int]
    params: SamplingParams  # max_new_tokens, stop_token_ids, seed, temperature, top_k, top_p
    emit: Callable[[Event], None]
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # report each token's logprob and this many alternatives; None: no logprobs
    echo_logprobs: bool = False  # also report the prompt tokens' logprobs (a PromptLogprobs event)
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to the logits before sampling
    constraint: Constraint | None = None  # response_format: only tokens its grammar allows are sampled
    adapter: str | None = None  # the LoRA adapter that answers (None: the base model)
    think_budget: int | None = None  # tokens of thinking before </think> is forced (None: no cap)
    cancelled: bool = False
    # an encoder-decoder's prompt, encoded at admission (`prompt` is then the decoder's start)
    source: list[int] | None = None
    # state kept by the scheduler
    length: int = 0  # tokens in this job's cache row
    decoding: bool = False  # the whole prompt is in the cache
    prompt_logits: list[torch.Tensor] = field(default_factory=list)  # echo_logprobs: each prefill chunk's logits
    last: int = -1  # the newest sampled token (not in the cache yet)
    generated: list[int] = field(default_factory=list)  # the tokens sampled so far (penalties read them)
    bias: torch.Tensor | None = None  # logit_bias as a [V] tensor
    completion_tokens: int = 0
    finished: bool = False
    generator: torch.Generator | None = None
    decoder: StreamDecoder | None = None
    matcher: StopMatcher | None = None
    budget: ThinkBudget | None = None
    forced: list[int] = field(default_factory=list)  # tokens fed instead of sampled (closing the thinking)


@dataclass
class Stats:
    max_batch_seen: int = 0  # most requests decoded in one step: proof that requests were batched
    steps: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    tokens: int = 0
    prefill_steps: int = 0  # forward passes over prompts
    prefill_tokens: int = 0  # prompt tokens run through the model
    cached_tokens: int = 0  # prompt tokens copied from the prefix cache instead


class Scheduler:
    def __init__(self, model: nn.Module, tokenizer: Tokenizer, max_batch: int = 16, max_concurrent: int = 64,
                 prefix_cache: bool = True, prefill_chunk: int = 0, prefix_blocks: int = 0) -> None:
        """`prefill_chunk`: most prompt tokens per prefill pass (0: whole prompts); `prefix_blocks`: blocks the
        prefix cache holds (0: as many tokens as the slot cache)."""
        if max_batch < 1 or max_concurrent < 1:
            raise LmforgeError(f"max_batch and max_concurrent must be >= 1, got {max_batch} and {max_concurrent}")
        if prefill_chunk < 0 or prefix_blocks < 0:
            raise LmforgeError(f"prefill_chunk and prefix_blocks must be >= 0, got {prefill_chunk} and {prefix_blocks}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_concurrent = max_batch, max_concurrent
        self.context = model.context_length
        self.device = next(model.parameters()).device
        self.cache = SlotCache(model, max_batch, self.context)
        self.encdec = isinstance(model, EncoderDecoder)
        self.prefix_lm = bool(model.cfg.prefix_lm)
        self.sources = SourceCache(max_batch, model.cfg.max_seq_len) if self.encdec else None
        # why the prefix cache is off although asked for (the server says so at startup and in /v1/models)
        self.prefix_cache_off = None
        if prefix_cache and (self.encdec or self.prefix_lm):
            self.prefix_cache_off = ("an encoder-decoder's decoder prompt is one start token" if self.encdec else
                                     "a prefix LM's prompt keys and values depend on the whole prompt")
            prefix_cache = False
        if self.prefix_lm and prefill_chunk:
            log.info("serve: a prefix LM prefills whole prompts (--prefill-chunk %d does not apply)", prefill_chunk)
            prefill_chunk = 0
        self.prefill_chunk = prefill_chunk
        self.multi_lora = bool(lora_layers(model))
        # several prompts share a pass only where one [n, T] mask says everything: no position bias, and no
        # window (the model would apply it again from slot 0); one-token decode rows take the window in the mask
        cfg = model.cfg
        # ALiBi and T5 biases are computed from one start slot per pass: such models run one request a pass
        self.position_bias = cfg.position in ("alibi", "t5")
        self.batch_prefill = not self.position_bias and not cfg.sliding_window
        if prefix_cache and getattr(model, "virtual_tokens", None) is not None:
            raise LmforgeError("prefix caching needs keys that depend on the prompt alone; this model has prompt "
                               "or prefix tuning tokens (serve it with prefix caching off)")
        self.prefix = PrefixCache(self.cache, prefix_blocks or max(1, max_batch * self.context // BLOCK)) \
            if prefix_cache else None
        self.stats = Stats()
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []  # job i owns cache row i; touched by the loop thread only
        self._unfinished = 0  # jobs submitted and not yet finished (what max_concurrent limits); under _cond
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- called from request handlers ----------------------------------------------------------

    def submit(self, job: Job) -> Job:
        self.submit_all([job])
        return job

    def submit_all(self, jobs: list[Job]) -> list[Job]:
        """Queue every job or none (a request with n > 1 or several prompts is one job per choice)."""
        for job in jobs:
            if not job.prompt:
                raise LmforgeError("the prompt is empty")
            if len(job.prompt) >= self.context:
                raise LmforgeError(f"the prompt has {len(job.prompt)} tokens; the model's context is {self.context}")
            if self.encdec and job.echo_logprobs:
                raise LmforgeError("prompt logprobs (echo) need a decoder-only model; this one is an "
                                   "encoder-decoder, whose prompt is its source")
        with self._cond:
            if self._unfinished + len(jobs) > self.max_concurrent:
                more = f" (this request needs {len(jobs)})" if len(jobs) > 1 else ""
                raise SchedulerBusy(f"too many concurrent requests: the limit is {self.max_concurrent}{more}")
            self._unfinished += len(jobs)
            self.waiting.extend(jobs)
            self._cond.notify()
        return jobs

    def cancel(self, job: Job) -> None:
        """The client went away: the loop frees the job's slot before its next step."""
        with self._cond:
            job.cancelled = True
            self._cond.notify()

    @property
    def in_flight(self) -> int:
        """Requests submitted and not finished yet. A finished job stops counting before its last event is
        sent (its row is freed later in the step), so a client that sends its next request as soon as the
        answer arrives is never refused for its own previous request."""
        return self._unfinished

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._loop, name="lmforge-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    # -- the loop thread ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self.waiting and not self.running:
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # a bug in the loop itself: fail what is running, keep serving
                log.exception("scheduler step failed")
                for job in self.running:
                    self._fail(job, "internal error while decoding")
                self.running = []

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: drop cancelled requests, admit waiting ones, one prefill pass, one decode step."""
        self._drop_cancelled()
        self._admit()
        self._prefill()
        self._decode()
        self._remove_finished()

    def _forward(self, jobs: list[Job], rows: list[int], starts: list[int], chunks: list[list[int]],
                 full: bool = False, prompts: bool = False) -> torch.Tensor:
        """Run chunk i of tokens at slots starts[i].. of cache row rows[i]. Logits [n, 1, V] at each chunk's last
        token, or with `full` [n, T, V] at every column (padded columns are garbage). `prompts`: the chunks are
        whole prompts (a prefix LM reads each as its bidirectional prefix)."""
        counts = [len(c) for c in chunks]
        T = max(counts)
        ids = torch.tensor([c + [0] * (T - len(c)) for c in chunks], device=self.device)
        self.cache.extend(rows, starts, counts)
        if self.multi_lora:
            set_row_adapters(self.model, [job.adapter for job in jobs])
        model, extra = self.model, prefill_kwargs(self.model, len(jobs), counts, self.device) if prompts else {}
        if self.encdec:  # the decoder over these rows' sources (its hidden states come scaled)
            model = SourceBound(self.model, *self.sources.read(rows))
        if len(jobs) == 1:  # the model's own causal mask, position bias and window, from slot starts[0]
            h = model(ids, cache=self.cache, start_pos=starts[0], return_hidden=True, **extra)
        else:
            columns = torch.minimum(torch.arange(T, device=self.device)[None, :],
                                    torch.tensor(counts, device=self.device)[:, None] - 1)
            positions = torch.tensor(starts, device=self.device)[:, None] + columns
            h = model(ids, cache=self.cache, start_pos=0, positions=positions, return_hidden=True,
                      attn_mask=extend_mask(starts, counts, self.device, self.model.cfg.sliding_window), **extra)
        if not full:  # the head only where a token is sampled: a long prompt's logits would be [T, V]
            h = h[torch.arange(len(jobs), device=self.device), torch.tensor(counts, device=self.device) - 1][:, None]
        if self.model.cfg.output_scale != 1.0 and not self.encdec:  # as `Transformer.forward` scales before the head
            h = h * self.model.cfg.output_scale
        return self.model.lm_head(h)

    def _decode(self) -> None:
        """One token for every job past its prompt."""
        batch = [(row, job) for row, job in enumerate(self.running) if job.decoding and not job.finished]
        if not batch:
            return
        rows, jobs = [r for r, _ in batch], [j for _, j in batch]
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(jobs))
        self.stats.steps += 1
        try:
            if self.position_bias:
                logits = torch.cat([self._forward([j], [r], [j.length], [[j.last]])[:, -1] for r, j in batch])
            else:
                logits = self._forward(jobs, rows, [j.length for j in jobs], [[j.last] for j in jobs])[:, -1]
        except Exception:
            log.exception("decode step failed")
            for job in jobs:
                self._fail(job, "internal error while decoding")
            return
        greedy = logits.argmax(dim=-1).tolist()
        for i, job in enumerate(jobs):
            job.length += 1
            self._take(job, logits[i:i + 1], greedy[i])

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = [j for j in self.waiting if j.cancelled]
            for job in gone:
                self.waiting.remove(job)
        for job in gone + [j for j in self.running if j.cancelled]:
            self._end(job)
            self.stats.cancelled += 1
        self._remove_finished()

    def _admit(self) -> None:
        """Give waiting jobs free rows (oldest first); copy what the prefix cache holds of their prompts into them.
        A job whose prompt shares more blocks with a prompt being prefilled than the cache holds yet waits for
        them (as SGLang's scheduler does), rather than computing the same blocks again beside it."""
        with self._cond:
            queue = list(self.waiting)
        for job in queue:
            if len(self.running) >= self.max_batch:
                return
            blocks = []
            if self.prefix is not None and not job.echo_logprobs:
                # at least the last prompt token is run: its logits give the first new token
                blocks = self.prefix.match(job.prompt[:-1], job.adapter)
                if self._coming(job, len(blocks)):
                    continue
            with self._cond:  # by identity: two choices of one request can be equal dataclasses
                self.waiting = collections.deque(j for j in self.waiting if j is not job)
            row = len(self.running)
            job.generator = new_generator(job.params.seed, self.device)
            job.decoder = StreamDecoder(self.tokenizer)
            job.matcher = StopMatcher(job.stop)
            if job.think_budget is not None:
                job.budget = ThinkBudget(job.think_budget, self.tokenizer)
            if job.logit_bias:
                job.bias = torch.zeros(self.model.cfg.vocab_size, device=self.device)
                job.bias[list(job.logit_bias)] = torch.tensor(list(job.logit_bias.values()), device=self.device)
            if blocks:
                self.prefix.load(blocks, row)
            if self.encdec:
                try:
                    self._encode(job, row)
                except Exception as e:
                    log.exception("encoding failed")
                    self._fail(job, f"encoding the prompt failed: {e}")
                    continue
            job.length = len(blocks) * BLOCK
            self.stats.cached_tokens += job.length
            self.running.append(job)

    def _encode(self, job: Job, row: int) -> None:
        """An encoder-decoder's prompt becomes its source: encoded once, its cross-attention keys and values kept
        in slot `row`; the decoder's prompt is `decoder_start_id` (as `lmforge.generate.engine.bind_sources`)."""
        source = torch.tensor([job.prompt], device=self.device)
        self.sources.put(row, self.model.memory_kv(self.model.encode(source)))
        job.source, job.prompt = job.prompt, [self.model.cfg.decoder_start_id]

    def _coming(self, job: Job, cached: int) -> bool:
        """Will a prompt being prefilled put more of `job`'s prompt blocks into the prefix cache than `cached`?"""
        want = (cached + 1) * BLOCK
        if len(job.prompt) - 1 < want:
            return False
        head = job.prompt[:want]
        return any(not other.decoding and not other.finished and other.adapter == job.adapter
                   and other.prompt[:want] == head for other in self.running)

    def _prefill(self) -> None:
        """One pass over the next chunks of the prompts being prefilled (oldest first, up to prefill_chunk
        tokens); a prompt that ends here samples its first token."""
        budget = self.prefill_chunk or self.context * self.max_batch
        batch = []
        for row, job in enumerate(self.running):
            if job.decoding or job.finished or budget == 0:
                continue
            n = min(len(job.prompt) - job.length, budget)
            batch.append((row, job, n))
            budget -= n
            if not self.batch_prefill:
                break
        if not batch:
            return
        jobs = [job for _, job, _ in batch]
        self.stats.prefill_steps += 1
        self.stats.prefill_tokens += sum(n for _, _, n in batch)
        try:
            full = any(job.echo_logprobs for job in jobs)
            logits = self._forward(jobs, [r for r, _, _ in batch], [j.length for j in jobs],
                                   [j.prompt[j.length:j.length + n] for _, j, n in batch], full, self.prefix_lm)
        except Exception as e:
            log.exception("prefill failed")
            for job in jobs:
                self._fail(job, f"prefill failed: {e}")
            return
        for i, (row, job, n) in enumerate(batch):
            job.length += n
            if self.prefix is not None:
                self.prefix.store(job.prompt[:job.length], row, job.adapter)  # waiting jobs may share these
            if job.echo_logprobs:
                job.prompt_logits.append(logits[i, :n])
            if job.length == len(job.prompt):
                self._prompt_done(job, logits[i, n - 1:n] if full else logits[i])

    def _prompt_done(self, job: Job, last: torch.Tensor) -> None:
        """The whole prompt is in the cache: send the prompt's logprobs if asked, sample."""
        job.decoding = True
        if job.echo_logprobs:
            logits, job.prompt_logits = torch.cat(job.prompt_logits), []
            following = torch.tensor(job.prompt[1:], dtype=torch.long, device=self.device)
            scored = _logprobs(logits[:-1], following, job.logprobs or 0)
            self._send(job, PromptLogprobs([TokenLogprob(job.prompt[0], None), *scored]))
        if job.params.max_new_tokens == 0:  # echo only: the prompt (and its logprobs) is the answer
            self._finish(job, "length")
        else:
            self._take(job, last, None)

    def _sample(self, job: Job, logits: torch.Tensor, greedy: int | None) -> int:
        """The next token from `logits` [1, V]; `greedy` is the batch's argmax of this row, when known."""
        history = None
        if job.params.needs_history:
            history = History.of([job.prompt + job.generated], len(job.prompt), self.device)
        if job.params.is_greedy and job.bias is None and history is None and job.constraint is None:
            return int(logits.argmax(dim=-1)[0]) if greedy is None else greedy
        if job.bias is not None:
            logits = logits.float() + job.bias
        if job.constraint is not None:
            logits = job.constraint.mask(logits)
        return int(sample_next(logits, job.params, job.generator, history)[0])

    def _take(self, job: Job, logits: torch.Tensor, greedy: int | None) -> None:
        """Sample the job's next token and send what it adds to the text; an error fails this job only."""
        try:
            token = job.forced.pop(0) if job.forced else self._sample(job, logits, greedy)
            scored = None
            if job.logprobs is not None:
                scored = _logprobs(logits, torch.tensor([token], device=logits.device), job.logprobs)[0]
            self._advance(job, token, scored)
        except Exception as e:
            log.exception("generation failed")
            self._fail(job, f"generation failed: {e}")

    def _advance(self, job: Job, token: int, scored: TokenLogprob | None = None) -> None:
        """Append `token` (or stop on a stop token); mark the job finished when it is done."""
        if token in job.params.stop_token_ids:
            return self._finish(job, "stop")
        if job.constraint is not None:
            job.constraint.consume(token)
        job.last = token
        job.generated.append(token)
        job.completion_tokens += 1
        self.stats.tokens += 1
        piece = job.decoder.push(token)
        if job.budget is not None:
            job.forced += job.budget.push(piece)
        text = job.matcher.push(piece)
        self._send(job, Delta(text, [scored]) if scored is not None else text)
        if job.matcher.stopped or (job.constraint is not None and job.constraint.complete):
            return self._finish(job, "stop")
        if job.completion_tokens >= job.params.max_new_tokens or job.length + 1 >= self.context:
            self._finish(job, "length")

    def _finish(self, job: Job, reason: str) -> None:
        if not job.matcher.stopped:
            self._send(job, job.matcher.push(job.decoder.flush()) + job.matcher.flush())
        self._end(job)
        self.stats.completed += 1
        self._send(job, Done(reason, len(job.source or job.prompt), job.completion_tokens))

    def _fail(self, job: Job, message: str) -> None:
        self._end(job)
        self.stats.failed += 1
        self._send(job, Failed(message))

    def _end(self, job: Job) -> None:
        """Mark `job` finished; it no longer counts against max_concurrent (once, however it ended)."""
        with self._cond:
            if not job.finished:
                job.finished = True
                self._unfinished -= 1

    def _send(self, job: Job, event: Event | str) -> None:
        if isinstance(event, str):
            if not event:
                return
            event = Delta(event)
        try:
            job.emit(event)
        except Exception:  # the receiver is gone (e.g. its event loop closed): treat as a disconnect
            job.cancelled = True

    def _remove_finished(self) -> None:
        """Drop finished rows, moving the last running row into each hole so rows stay 0..n-1."""
        for i in reversed(range(len(self.running))):
            if not self.running[i].finished:
                continue
            last = len(self.running) - 1
            if i != last:
                moved = self.running[last]
                self.cache.move(last, i, moved.length)
                if self.sources is not None:
                    self.sources.move(last, i)
                self.running[i] = moved
            self.running.pop()


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """For each row of `logits` [n, V]: the log-probability of `tokens[i]` under softmax(logits[i]) and the `top`
    most likely tokens with theirs."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, tokens[:, None])[:, 0].tolist()
    if top > 0:
        best = torch.topk(logp, min(top, logp.shape[-1]), dim=-1)
        pairs = [list(zip(i, v)) for i, v in zip(best.indices.tolist(), best.values.tolist())]
    else:
        pairs = [[] for _ in chosen]
    return [TokenLogprob(t, lp, p) for t, lp, p in zip(tokens.tolist(), chosen, pairs)]
