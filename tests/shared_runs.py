"""Expensive test fixtures made once per session and shared by every pytest-xdist worker."""

import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

# A persistent XLA compilation cache directory for the session's train.py runs: conftest.py
# makes it and exports its path under this name; test_train._train hands it to each run.
TRAIN_CACHE_ENV = "O1JAX_TEST_TRAIN_XLA_CACHE"


def made_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """The directory `make(path)` fills, made by the first worker that asks and reused by all.

    A module-scoped fixture runs once per worker, and xdist may send a module's tests to both
    workers, so a train.py run behind such a fixture would be made twice. The directory lives in
    the session's shared temp root; a file lock makes the other workers wait for it. `make` must
    raise on failure: the directory then counts as unmade, and the next worker starts it afresh.
    """
    root = tmp_path_factory.getbasetemp()
    if root.name.startswith("popen-gw"):  # an xdist worker: the parent is the session's root
        root = root.parent
    path, done = root / name, root / f"{name}.done"
    with FileLock(root / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            make(path)
            done.touch()
    return path
