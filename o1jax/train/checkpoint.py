"""Atomic, resumable checkpoints with orbax, and SIGTERM handling for preemptible machines.

A checkpoint is a pytree of arrays (trainable params or LoRA, optimizer state, replay buffer)
plus a JSON record (stage, step, data position, the run's config). Orbax writes each one to a
temporary directory and renames it when complete, so a kill at any moment leaves the previous
checkpoint intact; the last `keep` are kept. All randomness of a run is derived from
(seed, stage, step), so no RNG state needs saving beyond the step.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp

from o1jax.model.hf_io import CheckpointError

# Config keys that leave a run's numbers alone (the same up to float rounding): where
# checkpoints go, the device mesh, and how memory is spent (recomputation, loss chunks, gradient
# accumulation) and attention computed. A job restarted on a slice of another size may have to
# change them: a micro-batch must be a multiple of the mesh's batch axes, and a smaller slice
# may need remat where a larger one did not. None: the whole section.
LAYOUT_KEYS: dict[str, tuple[str, ...] | None] = {
    "checkpoint": None,
    "mesh": None,
    "model": ("remat", "attention_impl"),
    "sft": ("loss_chunk", "micro_batch_size"),
    "rl": ("loss_chunk", "micro_batch_size"),
}


def abstract_like(tree):
    """`tree` with each array replaced by its shape, dtype and sharding (`jax.ShapeDtypeStruct`):
    what `Checkpointer.restore` needs of its `like`, holding no device memory."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def numbers_config(config_dict: dict) -> dict:
    """`config_dict` without its `LAYOUT_KEYS`: what changes the numbers of a run."""
    out = {}
    for section, value in config_dict.items():
        keys = LAYOUT_KEYS.get(section, ())
        if keys is None:
            continue
        if isinstance(value, dict) and keys:
            value = {k: v for k, v in value.items() if k not in keys}
        out[section] = value
    return out


# Orbax by default writes a replicated array "replica-parallel": each of its R copies writes 1/R
# of it, cut out by an eager XLA slice (one compilation per shape). For arrays of a few MiB the
# slices cost far more than the writes they share out: on the 8 host devices of the smoke run,
# 7 saves took 8.3 s instead of 2.4 s. Only slices of at least this many bytes are written so.
MIN_REPLICA_SLICE_BYTES = 4 << 20


def _type_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
    """Orbax's standard handlers (scalars, NumPy and jax arrays, strings), with replica-parallel
    writes kept to large slices; a registry of our own, so orbax's global one is left alone."""
    scalar = ocp.type_handlers.ScalarHandler()
    return ocp.type_handlers.create_type_handler_registry(
        (int, scalar),
        (float, scalar),
        (bytes, scalar),
        (np.number, scalar),
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (
            jax.Array,
            ocp.type_handlers.ArrayHandler(
                min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES
            ),
        ),
        (str, ocp.type_handlers.StringHandler()),
    )


def config_fingerprint(config_dict: dict) -> str:
    """A stable hash of everything in the config that changes the numbers of a run."""
    relevant = numbers_config(config_dict)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2, read_only: bool = False):
        """read_only: for a reader of a workdir that may be training (evaluate, export,
        generate): it restores and never saves, deletes or cleans up, so a save in flight (its
        tmp directory) is left alone."""
        self.directory = os.path.abspath(directory)
        self.read_only = read_only
        self._manager = ocp.CheckpointManager(
            self.directory,
            # A save cut short by a kill leaves a tmp directory; the next run removes it.
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=not read_only,
                cleanup_tmp_directories=not read_only,
                read_only=read_only,
                # A save returns once committed (`save`): with orbax's background commit, each
                # next save logged our own wait as "Waiting for previous save ... took N s".
                enable_async_checkpointing=False,
            ),
            item_handlers={
                "state": ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers()),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """Saves and waits until the checkpoint is committed (renamed into place)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self._manager.wait_until_finished()

    def read_meta(self, step: int | None = None) -> dict | None:
        """The JSON record saved at `step` (None: the latest; None when there is none). A record
        that cannot be read is a `CheckpointError` naming the step directory (`restore`)."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )
            return _record(restored.meta)
        except Exception as e:  # what orbax raises varies (`_unreadable`)
            raise self._unreadable(step, e) from e

    def restore(self, step: int, like) -> tuple[object, dict]:
        """The state saved at `step`, with the structure, dtypes and shardings of `like`.

        Raises `CheckpointError` (one line, naming the step directory and what was wrong) when
        the saved state does not have `like`'s structure or shapes (e.g. one written by another
        version of o1jax), or when the checkpoint cannot be read: an item, a metadata or an array
        file missing, truncated or garbled. KeyboardInterrupt and SystemExit pass through."""
        abstract = abstract_like(like)
        state = ocp.args.PyTreeRestore(
            abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)
        )
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=state, meta=ocp.args.JsonRestore())
            )
            return restored.state, _record(restored.meta)
        except Exception as e:  # what orbax raises varies (`_unreadable`)
            raise self._unreadable(step, e) from e

    def _unreadable(self, step: int, error: Exception) -> CheckpointError:
        """`error`, raised by orbax reading `step`, as one line naming the step directory.

        Orbax raises ValueError for a state of another tree structure or shape, KeyError for a
        missing item ('Item "state" was not found'), json / tensorstore ValueErrors, FileNotFound
        or a bare Exception (wrapping tensorstore's "OUT_OF_RANGE" / "DATA_LOSS") for missing or
        truncated files, and AttributeError / TypeError / KeyError for valid JSON metadata of the
        wrong form; the innermost cause says most."""
        path = os.path.join(self.directory, str(step))
        reason = _reason(error)
        if any(m in reason for m in _MISMATCH):
            return CheckpointError(
                f"{path}: the saved state does not match this run's ({reason}); was it written "
                "by another version of o1jax? Start a new --workdir"
            )
        return CheckpointError(
            f"{path}: unreadable, the checkpoint is incomplete or damaged ({reason}); delete "
            "this directory to resume from the checkpoint before it, or start a new --workdir"
        )

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


# What orbax says of a readable state whose structure or shapes differ from the run's.
_MISMATCH = ("tree structures do not match", "is not compatible with the stored shape")
# The tail of tensorstore messages: the JSON spec of the array (hundreds of characters).
_SPEC_RE = re.compile(r"\s*\[tensorstore_spec.*$|\s*See full TensorStore details.*$")
_DRIVER_RE = re.compile(r'Error opening "\w+" driver: ')


def _record(meta) -> dict:
    """The saved JSON record; one that is not a JSON object is a damaged checkpoint."""
    if not isinstance(meta, dict):
        raise ValueError(f"the JSON record is a {type(meta).__name__}, not an object")
    return dict(meta)


def _reason(error: BaseException, limit: int = 300) -> str:
    """The first line of the innermost cause of `error` (tensorstore's spec and driver chatter
    cut), prefixed by its type unless that is ValueError or Exception, at most `limit` chars."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    text = _DRIVER_RE.sub("", _SPEC_RE.sub("", lines[0])).rstrip(" :") if lines else ""
    if type(error) not in (ValueError, Exception) or not text:
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class PreemptionFlag:
    """Set by SIGTERM; the training loops save a checkpoint and exit when they see it.

    In a multi-host run each host gets its own notice, perhaps steps apart; a host that stopped
    to save while another ran its next step would hang both in unmatched collectives. So
    `requested` is agreed: True on every process once any has been signalled. Each read is then
    a collective (a tiny all-gather), and every process must read it at the same points of the
    run, as the stage loops do.
    """

    def __init__(self):
        self._signalled = False  # this process's own notice
        self._previous = None

    @property
    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self._signalled
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.asarray(self._signalled))))

    @requested.setter
    def requested(self, value: bool) -> None:
        self._signalled = bool(value)

    def __enter__(self):
        def handler(signum, frame):
            self._signalled = True

        self._previous = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
        return False
