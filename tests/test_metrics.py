"""MetricsWriter: the JSONL log, truncation on resume, and the PNG's panels."""

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
