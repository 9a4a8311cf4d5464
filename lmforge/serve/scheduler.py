"""Continuous batching: one background thread runs the model; requests join and leave between steps.

Static batching waits for a whole batch to finish, so short answers idle behind long ones. Here
(Orca, Yu et al. 2022, "iteration-level scheduling") the loop repeats one iteration:

1. drop requests whose client went away (their slot is free at once);
2. admit waiting requests while slots are free: prefill each prompt into its own cache row and
   sample its first token;
3. one decode step for every running request together: each feeds its last token at its own
   position (per-row positions and a per-row key mask, `lmforge.serve.cache`), then samples;
4. finished requests (stop token, stop string, max_tokens, context full) leave.

A request's rows see exactly what they would see alone (same positions, same keys), so greedy
output does not depend on what else is running (tested). Each request samples with its own
generator, so a seed reproduces a request whatever it was batched with, and applies its own
`logit_bias` and penalties (which read the tokens it generated). A job that asks for logprobs gets,
with every token, its log-probability under the model's distribution (the raw logits, before bias,
penalties and temperature, as vLLM reports them) and the most likely alternatives; `echo_logprobs`
scores the prompt's tokens too, from the prefill's logits. Errors stay local: an
exception while prefilling or sampling one request fails that request only; an exception in a
shared decode step fails the requests in that step, and the loop goes on.
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
from lmforge.generate.sampling import SamplingParams, new_generator, sample_next
from lmforge.generate.stops import StopMatcher
from lmforge.serve.cache import SlotCache, decode_mask
from lmforge.serve.grammar import Constraint
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
    cancelled: bool = False
    # state kept by the scheduler
    length: int = 0  # tokens in this job's cache row
    last: int = -1  # the newest sampled token (not in the cache yet)
    generated: list[int] = field(default_factory=list)  # the tokens sampled so far (penalties read them)
    bias: torch.Tensor | None = None  # logit_bias as a [V] tensor
    completion_tokens: int = 0
    finished: bool = False
    generator: torch.Generator | None = None
    decoder: StreamDecoder | None = None
    matcher: StopMatcher | None = None


@dataclass
class Stats:
    max_batch_seen: int = 0  # most requests decoded in one step: proof that requests were batched
    steps: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    tokens: int = 0


class Scheduler:
    def __init__(self, model: nn.Module, tokenizer: Tokenizer, max_batch: int = 16, max_concurrent: int = 64) -> None:
        if max_batch < 1 or max_concurrent < 1:
            raise LmforgeError(f"max_batch and max_concurrent must be >= 1, got {max_batch} and {max_concurrent}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_concurrent = max_batch, max_concurrent
        self.context = model.context_length
        self.device = next(model.parameters()).device
        self.cache = SlotCache(model, max_batch, self.context)
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
        """One iteration: drop cancelled requests, admit waiting ones, decode all running ones once."""
        self._drop_cancelled()
        self._admit()
        if not self.running:
            return
        lengths = torch.tensor([j.length for j in self.running], device=self.device)
        tokens = torch.tensor([[j.last] for j in self.running], device=self.device)
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(self.running))
        self.stats.steps += 1
        try:
            self.cache.decode(lengths)
            logits = self.model(tokens, cache=self.cache, start_pos=0, positions=lengths[:, None],
                                attn_mask=decode_mask(lengths))[:, -1]
        except Exception:
            log.exception("decode step failed")
            for job in self.running:
                self._fail(job, "internal error while decoding")
            self.running = []
            return
        greedy = logits.argmax(dim=-1).tolist()
        for i, job in enumerate(self.running):
            job.length += 1
            self._take(job, logits[i:i + 1], greedy[i])
        self._remove_finished()

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
        while len(self.running) < self.max_batch:
            with self._cond:
                if not self.waiting:
                    return
                job = self.waiting.popleft()
            row = len(self.running)
            try:
                logits = self._prefill(job, row)
            except Exception as e:
                log.exception("prefill failed")
                self._fail(job, f"prefill failed: {e}")
                continue
            self.running.append(job)
            if job.params.max_new_tokens == 0:  # echo only: the prompt (and its logprobs) is the answer
                self._finish(job, "length")
            else:
                self._take(job, logits, None)
            if job.finished:
                self._remove_finished()

    def _prefill(self, job: Job, row: int) -> torch.Tensor:
        """Run the prompt into cache row `row`; the logits [1, V] of the first new token."""
        job.generator = new_generator(job.params.seed, self.device)
        job.decoder = StreamDecoder(self.tokenizer)
        job.matcher = StopMatcher(job.stop)
        self.cache.prefill(row)
        ids = torch.tensor([job.prompt], device=self.device)
        logits = self.model(ids, cache=self.cache, start_pos=0)[0]
        job.length = len(job.prompt)
        if job.logit_bias:
            job.bias = torch.zeros(logits.shape[-1], device=self.device)
            job.bias[list(job.logit_bias)] = torch.tensor(list(job.logit_bias.values()), device=self.device)
        if job.echo_logprobs:
            following = torch.tensor(job.prompt[1:], dtype=torch.long, device=self.device)
            scored = _logprobs(logits[:-1], following, job.logprobs or 0)
            self._send(job, PromptLogprobs([TokenLogprob(job.prompt[0], None), *scored]))
        return logits[-1:]

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
            token = self._sample(job, logits, greedy)
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
        text = job.matcher.push(job.decoder.push(token))
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
        self._send(job, Done(reason, len(job.prompt), job.completion_tokens))

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
