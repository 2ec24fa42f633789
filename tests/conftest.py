"""Test set-up: eight host devices so sharding tests can build real meshes on a CPU, and one
persistent XLA compilation cache for every `train.py` subprocess of the session."""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from shared_runs import TRAIN_CACHE_ENV


def pytest_configure(config):
    # The controller makes the directory before xdist starts its workers, which inherit the
    # variable; `test_train._train` hands it to each train.py run it launches. Runs of the same
    # config (a killed run and its resumptions) then compile each program once.
    if not hasattr(config, "workerinput"):
        os.environ[TRAIN_CACHE_ENV] = tempfile.mkdtemp(prefix="o1jax-train-xla-cache-")


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):
        shutil.rmtree(os.environ.pop(TRAIN_CACHE_ENV, ""), ignore_errors=True)
