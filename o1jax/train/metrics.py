"""Run observability: TensorBoard scalars, a JSONL log beside them, and a PNG of the curves.

    writer = MetricsWriter(workdir)
    writer.scalars(step, {"sft/loss": 1.2, "sft/tokens_per_s": 3e4})
    writer.plot()          # workdir/learning_curves.png
    writer.close()

Only process 0 writes (multi-host runs log once).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict

import jax

EVAL_PREFIX = "eval/"


def panels(names: list[str]) -> list[tuple[str, list[str]]]:
    """The PNG's panels as (title, scalars): every `eval/` scalar in one first panel, so the
    held-out accuracies before and after RL sit side by side; one panel per other scalar."""
    evals = [n for n in names if n.startswith(EVAL_PREFIX)]
    rest = [(n, [n]) for n in names if not n.startswith(EVAL_PREFIX)]
    return ([("held-out evaluation (eval/)", evals)] if evals else []) + rest


class MetricsWriter:
    def __init__(self, workdir: str, enabled: bool | None = None):
        self.workdir = workdir
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        self._log_path = os.path.join(workdir, "metrics.jsonl")
        if self.enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(workdir, exist_ok=True)
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items()}
        for name, value in clean.items():
            self._tb.add_scalar(name, value, step)
        with open(self._log_path, "a") as f:
            f.write(json.dumps({"step": int(step), **clean}) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drops logged rows past `step` (a resumed run logs those steps again)."""
        if not self.enabled or not os.path.exists(self._log_path):
            return
        rows = [line for line, row in self._rows() if row["step"] <= step]
        with open(self._log_path, "w") as f:
            f.writelines(rows)

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
