"""Document filters: each a small `Step` dataclass with the published default thresholds."""
