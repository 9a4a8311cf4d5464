"""Requests for the serving scheduler without the HTTP app: greedy jobs, and running a list of them to the end
(the engine tests and the architecture tests share them)."""

from __future__ import annotations

from lmforge.generate.sampling import SamplingParams
from lmforge.serve.scheduler import Job, Scheduler


def job(prompt: list[int], n: int, **kw) -> Job:
    """A greedy request for `n` new tokens whose events are dropped (the test reads `Job.generated`)."""
    return Job(prompt, SamplingParams(greedy=True, max_new_tokens=n), lambda ev: None, **kw)


def run(scheduler: Scheduler, jobs: list[Job]) -> list[list[int]]:
    """Submit `jobs`, step the scheduler until none is in flight, and return each job's generated ids."""
    for j in jobs:
        scheduler.submit(j)
    while scheduler.in_flight:
        scheduler.step()
    return [j.generated for j in jobs]
