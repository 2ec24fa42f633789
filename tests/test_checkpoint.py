"""Run checkpoints: a round trip, and a clear one-line error for a state of another layout or a
damaged checkpoint."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from o1jax.model import CheckpointError
from o1jax.train.checkpoint import Checkpointer


def _state(levels):
    return {"lora": jnp.arange(3, dtype=jnp.float32), "buffer": levels}


def test_restore_gives_back_what_was_saved(tmp_path):
    checkpointer = Checkpointer(str(tmp_path))
    saved = _state((jnp.ones(1), jnp.full((16,), 2.0)))
    checkpointer.save(7, saved, {"stage": "rl", "step": 7})
    # The template holds zeros, not the saved values: a restore that handed its template back
    # would pass a test whose template is the saved state itself.
    restored, meta = checkpointer.restore(7, jax.tree.map(jnp.zeros_like, saved))
    checkpointer.close()
    assert meta == {"stage": "rl", "step": 7}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_state_of_another_layout_is_a_one_line_checkpoint_error(tmp_path):
    # An older o1jax's replay buffer kept one array per level; this one keeps one flat array.
    # (A shape mismatch is not exercised here: orbax fails it mid-read and leaves its pending
    # reads to warn in whichever test runs next. The config fingerprint already refuses a
    # workdir whose config, and so whose shapes, differ.)
    like = _state(jnp.zeros(17))
    checkpointer = Checkpointer(str(tmp_path))
    checkpointer.save(3, _state((jnp.ones(1), jnp.full((16,), 2.0))), {"stage": "rl"})
    with pytest.raises(CheckpointError) as error:
        checkpointer.restore(3, like)
    checkpointer.close()
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "3") + ":")


def test_a_save_cut_short_by_a_kill_leaves_no_directory_behind(tmp_path):
    """A kill mid-save leaves orbax's tmp directory; at 27B scale each is as large as a
    checkpoint, so the next run must remove it rather than keep it forever."""
    checkpointer = Checkpointer(str(tmp_path), keep=1)
    checkpointer.save(2, _state(jnp.ones(4)), {"stage": "sft"})
    checkpointer.close()
    (tmp_path / "3.orbax-checkpoint-tmp-12345").mkdir()
    checkpointer = Checkpointer(str(tmp_path), keep=1)
    assert checkpointer.latest_step() == 2
    checkpointer.save(3, _state(jnp.ones(4)), {"stage": "sft"})
    checkpointer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3"]


def _truncate(path, size=0):
    with open(path, "r+b") as f:
        f.truncate(size)


def _largest_file(directory):
    files = [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names]
    return max(files, key=os.path.getsize)


# A saved checkpoint damaged after the fact (a disk fault, a partial copy between machines).
# The state is one array, so orbax has no other reads in flight when the damaged one fails.
DAMAGES = {
    "the state item deleted": (
        lambda step: shutil.rmtree(step / "state"),
        'Item "state" was not found',
    ),
    "its tree metadata truncated": (lambda step: _truncate(step / "state" / "_METADATA", 9), ""),
    "its array file truncated": (
        lambda step: _truncate(_largest_file(step / "state" / "ocdbt.process_0"), 2000),
        "",
    ),
    "the JSON record not an object": (
        lambda step: (step / "meta" / "metadata").write_text("[1, 2]"),
        "the JSON record is a list, not an object",
    ),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_a_one_line_error_naming_its_step_directory(tmp_path, damage):
    state = {"lora": jnp.arange(100_000, dtype=jnp.float32)}  # [100000]: its own data file
    checkpointer = Checkpointer(str(tmp_path))
    checkpointer.save(3, state, {"stage": "rl"})
    checkpointer.close()
    corrupt, says = DAMAGES[damage]
    corrupt(tmp_path / "3")
    checkpointer = Checkpointer(str(tmp_path))  # as a resumed run opens it
    with pytest.raises(CheckpointError) as error:
        checkpointer.restore(3, state)
    checkpointer.close()
    message = str(error.value)
    assert "\n" not in message and len(message) < 600
    assert message.startswith(f"{tmp_path / '3'}: unreadable, the checkpoint is incomplete or")
    assert says in message


def test_a_damaged_json_record_is_a_checkpoint_error_for_read_meta_too(tmp_path):
    checkpointer = Checkpointer(str(tmp_path))
    checkpointer.save(5, _state(jnp.ones(4)), {"stage": "sft", "step": 5})
    _truncate(tmp_path / "5" / "meta" / "metadata", 3)
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / '5'}: unreadable.*JSONDecodeError"):
        checkpointer.read_meta()
    checkpointer.close()


def test_an_interrupt_while_restoring_is_not_turned_into_a_checkpoint_error(tmp_path, monkeypatch):
    checkpointer = Checkpointer(str(tmp_path))
    checkpointer.save(1, _state(jnp.ones(4)), {"stage": "sft"})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpointer._manager, "restore", interrupted)
    for read in (lambda: checkpointer.restore(1, _state(jnp.ones(4))), checkpointer.read_meta):
        with pytest.raises(KeyboardInterrupt):
            read()
    checkpointer.close()


def test_train_py_on_a_workdir_with_a_damaged_checkpoint_exits_2_with_one_line(
    tmp_path, monkeypatch, capsys
):
    """The resumed run reads the latest checkpoint's record first: a damaged one stops it with
    one `error:` line naming that step's directory, before anything is trained."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.syspath_prepend(root)
    import train

    workdir = tmp_path / "w"
    checkpointer = Checkpointer(str(workdir / "checkpoints"))
    checkpointer.save(1, _state(jnp.ones(4)), {"stage": "sft", "step": 1})
    checkpointer.close()
    _truncate(workdir / "checkpoints" / "1" / "meta" / "metadata", 3)
    config = os.path.join(root, "configs", "smoke.yaml")
    assert train.main(["--config", config, "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("error:")]
    assert len(lines) == 1, err[-5:]
    assert lines[0].startswith(f"error: {workdir / 'checkpoints' / '1'}: unreadable")


_PREEMPTION_HOST = """
import os, signal, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
process, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process,
                           initialization_timeout=60)
from o1jax.train.checkpoint import PreemptionFlag
with PreemptionFlag() as flag:
    before = flag.requested
    if process == 0:  # only this host gets the notice
        os.kill(os.getpid(), signal.SIGTERM)
    print("flag", before, flag.requested, flush=True)
"""


def test_a_preemption_notice_to_one_host_is_seen_by_every_host():
    """Two processes of a multi-host run (jax.distributed on this CPU): SIGTERM reaches only
    process 0, and both read `requested` as True at the same point, so neither runs a step
    whose collectives the other, stopping to save, would never join."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device per process
    hosts = [
        subprocess.Popen(
            [sys.executable, "-c", _PREEMPTION_HOST, str(i), port],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [host.communicate(timeout=120) for host in hosts]
    for host, (out, err) in zip(hosts, outputs, strict=True):
        assert host.returncode == 0, err[-2000:]
        assert [line for line in out.splitlines() if line.startswith("flag")] == ["flag False True"]


def test_saving_a_replicated_state_on_eight_devices_compiles_nothing(tmp_path):
    """Orbax's default replica-parallel write cut each replicated array into one slice per
    device with an eager XLA op, lowering and compiling a program per shape at every first save
    (on the smoke run: 8.3 s of saves instead of 2.4 s). Small arrays are written whole."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # Shapes no other test uses, so no program for them is in jax's in-memory caches.
    state = {
        "a": jax.device_put(jnp.ones((8 * 37, 11)), replicated),
        "b": jax.device_put(jnp.ones((8 * 5, 3, 19)), replicated),
    }
    lowered = []

    def listen(event, seconds, **kwargs):
        if event.startswith("/jax/core/compile/"):
            lowered.append(event)

    checkpointer = Checkpointer(str(tmp_path))
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        checkpointer.save(1, state, {"stage": "sft"})
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    restored, _ = checkpointer.restore(1, state)
    checkpointer.close()
    assert lowered == []
    np.testing.assert_array_equal(np.asarray(restored["b"]), np.ones((40, 3, 19)))


def test_a_save_does_not_report_waiting_for_the_one_before(tmp_path, monkeypatch, caplog):
    """Each save returns once committed, so the next has nothing to wait for. With orbax's
    background commit our own wait was logged at the next save as "Waiting for previous save to
    complete took N seconds ... consider checkpointing less frequently" (the default run's last
    save, 1.5 s). Here the threshold is 5 ms (a save's commit takes longer; looking for a
    finished save, under 0.1 ms)."""
    from orbax.checkpoint import checkpoint_manager

    monkeypatch.setattr(checkpoint_manager, "_WAIT_FOR_PREV_SAVE_WARNING_THRESHOLD_SECS", 0.005)
    checkpointer = Checkpointer(str(tmp_path))
    with caplog.at_level("WARNING"):
        for step in (1, 2, 3):
            state = _state(jax.random.normal(jax.random.key(step), (1 << 22,)))  # 16 MiB
            checkpointer.save(step, state, {"stage": "sft"})
    checkpointer.close()
    assert not [r for r in caplog.records if "Waiting for previous save" in r.getMessage()]
    assert checkpointer.latest_step() == 3


def test_a_checkpoint_written_by_standard_save_still_restores(tmp_path):
    """Before the twenty-second session a Checkpointer wrote its state with orbax's StandardSave;
    the workdirs of those runs must still resume."""
    import orbax.checkpoint as ocp

    saved = _state((jnp.ones(1), jnp.full((16,), 2.0)))
    manager = ocp.CheckpointManager(str(tmp_path))
    args = ocp.args.Composite(state=ocp.args.StandardSave(saved), meta=ocp.args.JsonSave({"a": 1}))
    manager.save(5, args=args)
    manager.wait_until_finished()
    manager.close()
    checkpointer = Checkpointer(str(tmp_path))
    restored, meta = checkpointer.restore(5, jax.tree.map(jnp.zeros_like, saved))
    checkpointer.close()
    assert meta == {"a": 1}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
