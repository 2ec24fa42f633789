"""MetricsWriter: the JSONL log, truncation on resume, TensorBoard events, and the PNG's panels."""

import collections
import glob
import struct

import pytest

from o1jax.train.metrics import MetricsWriter, panels


def test_eval_scalars_share_the_first_panel_and_the_rest_get_one_each():
    names = ["eval/rl_pass1", "ppo/kl", "eval/sft_pass1", "sft/loss"]
    assert panels(names) == [
        ("held-out evaluation (eval/)", ["eval/rl_pass1", "eval/sft_pass1"]),
        ("ppo/kl", ["ppo/kl"]),
        ("sft/loss", ["sft/loss"]),
    ]
    assert panels(["sft/loss"]) == [("sft/loss", ["sft/loss"])]


def test_history_survives_truncation_and_the_plot_is_written(tmp_path):
    writer = MetricsWriter(str(tmp_path), enabled=True)
    for step in range(1, 6):
        writer.scalars(step, {"sft/loss": 1.0 / step})
    writer.scalars(5, {"eval/sft_pass1": 0.3, "eval/search_accuracy": 0.25})
    writer.truncate_after(3)  # a run resumed from step 3 logs 4 and 5 again
    assert writer.history()["sft/loss"] == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    writer.scalars(4, {"eval/sft_pass1": 0.4, "eval/rl_pass1": 0.5})
    path = writer.plot()
    writer.close()
    assert path == str(tmp_path / "learning_curves.png")
    assert (tmp_path / "learning_curves.png").stat().st_size > 5_000


def test_a_row_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    writer = MetricsWriter(str(tmp_path), enabled=True)
    for step in (1, 2):
        writer.scalars(step, {"sft/loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('\n{"step": 3, "sft/lo')  # a blank line, then a partial row
    writer.truncate_after(5)
    assert writer.history() == {"sft/loss": [(1, 1.0), (2, 2.0)]}
    writer.scalars(3, {"sft/loss": 3.0})
    assert writer.history()["sft/loss"][-1] == (3, 3.0)
    writer.close()


def _tensorboard_steps(workdir) -> collections.Counter:
    """(tag, step) -> number of scalar events in the workdir's TensorBoard event files."""
    from tensorboardX.proto import event_pb2

    counts = collections.Counter()
    for path in sorted(glob.glob(f"{workdir}/tensorboard/events.*")):
        with open(path, "rb") as f:
            while len(head := f.read(8)) == 8:
                (size,) = struct.unpack("<Q", head)
                f.read(4)
                event = event_pb2.Event.FromString(f.read(size))
                f.read(4)
                for value in event.summary.value:
                    counts[(value.tag, event.step)] += 1
    return counts


def test_tensorboard_holds_each_kept_row_once_after_a_kill_and_a_resume(tmp_path):
    killed = MetricsWriter(str(tmp_path), enabled=True)
    for step in range(1, 5):
        killed.scalars(step, {"sft/loss": 1.0 / step})
    # SIGKILL: the writer is never closed. The resumed run keeps the 2 rows its checkpoint
    # covers and logs step 3 again.
    resumed = MetricsWriter(str(tmp_path), enabled=True)
    resumed.keep_rows(2)
    resumed.scalars(3, {"sft/loss": 0.3})
    resumed.close()
    assert _tensorboard_steps(tmp_path) == {("sft/loss", s): 1 for s in (1, 2, 3)}
    assert resumed.history()["sft/loss"] == [(1, 1.0), (2, 0.5), (3, 0.3)]


def test_a_kill_while_the_log_is_cut_back_leaves_the_old_log_whole(tmp_path, monkeypatch):
    writer = MetricsWriter(str(tmp_path), enabled=True)
    for step in range(1, 6):
        writer.scalars(step, {"sft/loss": float(step)})
    before = (tmp_path / "metrics.jsonl").read_text()

    def killed(*args):
        raise KeyboardInterrupt  # stands for a SIGKILL before the new log takes the old's place

    monkeypatch.setattr("o1jax.train.metrics.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        writer.keep_rows(3)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    writer.close()


def test_tensorboard_logging_loads_no_pytorch_and_leaves_it_importable(tmp_path):
    """tensorboardX imports torch when it can; a train.py process logs floats only and must not
    pay for it (1.6 s, ~190 MB). A later `import torch` must still work."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from o1jax.train.metrics import MetricsWriter\n"
        f"writer = MetricsWriter({str(tmp_path)!r})\n"
        "writer.scalars(1, {'sft/loss': 2.5})\n"
        "writer.close()\n"
        "assert 'torch' not in sys.modules, 'tensorboardX loaded torch'\n"
        "import torch\n"
        "print(torch.ones(2).sum().item())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "2.0"
    assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
