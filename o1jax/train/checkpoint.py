"""Atomic, resumable checkpoints with orbax, and SIGTERM handling for preemptible machines.

A checkpoint is a pytree of arrays (trainable params or LoRA, optimizer state, replay buffer)
plus a JSON record (stage, step, data position, config fingerprint). Orbax writes each one to a
temporary directory and renames it when complete, so a kill at any moment leaves the previous
checkpoint intact; the last `keep` are kept. All randomness of a run is derived from
(seed, stage, step), so no RNG state needs saving beyond the step.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal

import jax
import orbax.checkpoint as ocp

from o1jax.model.hf_io import CheckpointError


def config_fingerprint(config_dict: dict) -> str:
    """A stable hash of everything in the config that changes the numbers of a run."""
    relevant = {k: v for k, v in config_dict.items() if k not in ("checkpoint",)}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            # A save cut short by a kill leaves a tmp directory; the next run removes it.
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, cleanup_tmp_directories=True
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """Saves and waits until the checkpoint is committed (renamed into place)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def read_meta(self, step: int | None = None) -> dict | None:
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored.meta)

    def restore(self, step: int, like) -> tuple[object, dict]:
        """The state saved at `step`, with the structure, dtypes and shardings of `like`.

        Raises `CheckpointError` (one line, naming the checkpoint) when the saved state does not
        have `like`'s structure or shapes, e.g. one written by another version of o1jax."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                ),
            )
        except ValueError as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{os.path.join(self.directory, str(step))}: the saved state does not match this "
                f"run's ({reason}); was it written by another version of o1jax? Start a new "
                "--workdir"
            ) from e
        return restored.state, dict(restored.meta)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


class PreemptionFlag:
    """Set by SIGTERM; the training loops save a checkpoint and exit when they see it."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            self.requested = True

        self._previous = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
        return False
