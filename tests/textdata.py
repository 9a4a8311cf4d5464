"""Real text for tests, present on every machine.

tinyshakespeare from the workspace's `shared/data/` when the checkout sits beside it (CI does);
otherwise the English documentation every Python ships (`pydoc_data.topics`), written once to a
temp file so tests can treat both alike.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def shared_file(name: str) -> Path | None:
    roots = [os.environ.get("LMFORGE_SHARED_DATA", "")]
    roots += [str(p / "shared" / "data") for p in Path(__file__).resolve().parents]
    for root in roots:
        if root and (Path(root) / name).is_file():
            return Path(root) / name
    return None


def _pydoc_english() -> Path:
    from pydoc_data.topics import topics

    path = Path(tempfile.gettempdir()) / "lmforge-tests-pydoc-english.txt"
    if not path.is_file():
        text = "\n\n".join(topics[k] for k in sorted(topics))
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return path


SHAKESPEARE: Path = shared_file("tinyshakespeare.txt") or _pydoc_english()
