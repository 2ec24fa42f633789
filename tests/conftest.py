"""Test set-up: eight host devices so sharding tests can build real meshes on a CPU, one
persistent XLA compilation cache for every `train.py` subprocess of the session, and one for
the test processes themselves."""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from shared_runs import TRAIN_CACHE_ENV

# The session's compilation cache for the pytest processes (made by the controller, as above).
TEST_CACHE_ENV = "O1JAX_TEST_XLA_CACHE"


def pytest_configure(config):
    # The controller makes the directory before xdist starts its workers, which inherit the
    # variable; `test_train._train` hands it to each train.py run it launches. Runs of the same
    # config (a killed run and its resumptions) then compile each program once.
    if not hasattr(config, "workerinput"):
        os.environ[TRAIN_CACHE_ENV] = tempfile.mkdtemp(prefix="o1jax-train-xla-cache-")
        os.environ[TEST_CACHE_ENV] = tempfile.mkdtemp(prefix="o1jax-test-xla-cache-")
    # xdist spreads a module's tests over the workers, and each worker compiled the programs
    # they share again: the workers now share what took 0.5 s or more to compile (about a tenth
    # of the suite's CPU time).
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ[TEST_CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):
        for name in (TRAIN_CACHE_ENV, TEST_CACHE_ENV):
            shutil.rmtree(os.environ.pop(name, ""), ignore_errors=True)
