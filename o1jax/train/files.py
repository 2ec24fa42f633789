"""Files of a workdir written atomically: a kill mid-write leaves the old file or the new one,
never a cut one that the next start would read."""

from __future__ import annotations

import os


def write_atomically(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary sibling, synced, then renamed into place."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
