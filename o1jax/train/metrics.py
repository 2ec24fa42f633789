"""Run observability: TensorBoard scalars, a JSONL log beside them, and a PNG of the curves.

    writer = MetricsWriter(workdir)
    writer.scalars(step, {"sft/loss": 1.2, "sft/tokens_per_s": 3e4})
    writer.plot()          # workdir/learning_curves.png
    writer.close()

Only process 0 writes (multi-host runs log once). The JSONL log is the record, written row by
row; TensorBoard's events are queued by tensorboardX and may be lost by a kill. So a resumed run
cuts the log back to what its checkpoint covers (`keep_rows`) and rebuilds the TensorBoard
events from it: a killed and resumed run ends with the same scalars, each once, as an
uninterrupted one, in both.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections import defaultdict

import jax

from o1jax.train.files import write_atomically

EVAL_PREFIX = "eval/"


def is_primary() -> bool:
    """Whether this process writes the run's files: process 0 (every process of a multi-host run
    computes the same numbers; orbax coordinates the checkpoints itself)."""
    return jax.process_index() == 0


def panels(names: list[str]) -> list[tuple[str, list[str]]]:
    """The PNG's panels as (title, scalars): every `eval/` scalar in one first panel, so the
    held-out accuracies before and after RL sit side by side; one panel per other scalar."""
    evals = [n for n in names if n.startswith(EVAL_PREFIX)]
    rest = [(n, [n]) for n in names if not n.startswith(EVAL_PREFIX)]
    return ([("held-out evaluation (eval/)", evals)] if evals else []) + rest


def summary_writer_class():
    """tensorboardX's SummaryWriter, imported without PyTorch unless torch is already loaded.

    tensorboardX imports torch whenever it is installed (to accept torch tensors): 1.6 s and
    about 190 MB of a train.py process that logs only floats. With `sys.modules["torch"]` set to
    None, `import torch` raises the ImportError tensorboardX falls back on; the entry is removed
    again, so a later `import torch` loads it as usual.
    """
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
    else:
        sys.modules["torch"] = None
        try:
            from tensorboardX import SummaryWriter
        finally:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    def __init__(self, workdir: str, enabled: bool | None = None):
        self.workdir = workdir
        self.enabled = is_primary() if enabled is None else enabled
        self._tb = None
        self._log_path = os.path.join(workdir, "metrics.jsonl")
        self._tb_dir = os.path.join(workdir, "tensorboard")
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._tb = self._open_tensorboard()

    def _open_tensorboard(self, suffix: str = ""):
        return summary_writer_class()(self._tb_dir, filename_suffix=suffix)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items()}
        for name, value in clean.items():
            self._tb.add_scalar(name, value, step)
        with open(self._log_path, "a") as f:
            f.write(json.dumps({"step": int(step), **clean}) + "\n")

    def num_rows(self) -> int:
        """Readable rows in the log (what a checkpoint records it covers)."""
        if not self.enabled or not os.path.exists(self._log_path):
            return 0
        return len(self._rows())

    def keep_rows(self, count: int) -> None:
        """Keeps the first `count` rows (a resumed run logs the rest again)."""
        if self.enabled and os.path.exists(self._log_path):
            self._rewrite(self._rows()[:count])

    def truncate_after(self, step: int) -> None:
        """Drops logged rows past `step` (for checkpoints that did not record `num_rows`)."""
        if self.enabled and os.path.exists(self._log_path):
            self._rewrite([(line, row) for line, row in self._rows() if row["step"] <= step])

    def _rewrite(self, rows: list[tuple[str, dict]]) -> None:
        """Replaces the log with `rows` atomically, then TensorBoard's events with theirs (in
        a file of their own, closed so that every event is on disk before the run goes on)."""
        write_atomically(self._log_path, "".join(line for line, _ in rows))
        self._tb.close()
        shutil.rmtree(self._tb_dir, ignore_errors=True)
        rebuilt = self._open_tensorboard(suffix=".resumed")
        for _, row in rows:
            for name, value in row.items():
                if name != "step":
                    rebuilt.add_scalar(name, value, row["step"])
        rebuilt.close()
        self._tb = self._open_tensorboard()

    def history(self) -> dict[str, list[tuple[int, float]]]:
        """Every logged scalar as (step, value) pairs, from the JSONL log (survives resumes)."""
        series: dict[str, list[tuple[int, float]]] = defaultdict(list)
        if not os.path.exists(self._log_path):
            return series
        for _, row in self._rows():
            step = row.pop("step")
            for k, v in row.items():
                series[k].append((step, v))
        return series

    def _rows(self) -> list[tuple[str, dict]]:
        """(line, row) of every readable row of the log. A line cut short by a kill mid-write
        (or blank) is left out, so the resumed run writes that step again."""
        rows = []
        with open(self._log_path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and "step" in row:
                    rows.append((line if line.endswith("\n") else line + "\n", row))
        return rows

    def plot(self, path: str | None = None, keys: list[str] | None = None) -> str | None:
        """Writes the learning curves as a PNG grid (see `panels`); returns its path."""
        if not self.enabled:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        series = self.history()
        grid = panels([k for k in (keys or sorted(series)) if series.get(k)])
        if not grid:
            return None
        cols = min(3, len(grid))
        rows = math.ceil(len(grid) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
        for ax, (title, names) in zip(axes.flat, grid, strict=False):
            for name in names:
                steps, values = zip(*series[name], strict=True)
                label = name.removeprefix(EVAL_PREFIX) if len(names) > 1 else None
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=label)
            if len(names) > 1:
                ax.legend(fontsize=7)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: no 651.5
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(grid) :]:
            ax.axis("off")
        fig.tight_layout()
        path = path or os.path.join(self.workdir, "learning_curves.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
