"""Small stand-ins shared by tests."""

from __future__ import annotations

from typing import Any


class RepeatedBatch:
    """One batch forever, with the resumable-source methods `train_loop` expects."""

    def __init__(self, batch: Any) -> None:
        self.batch = batch

    def next_batch(self) -> Any:
        return self.batch

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
