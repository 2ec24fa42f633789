"""The README's notebook quickstart runs as written, and one PPO step works on its search tree."""

import os
import re
import runpy

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_quickstart_then_one_ppo_step(tmp_path, capsys):
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) == 1, "the README has one Python quickstart"
    script = tmp_path / "quickstart.py"
    script.write_text(blocks[0])
    ns = runpy.run_path(str(script))
    assert "nodes" in capsys.readouterr().out
    tree = ns["tree"]
    assert int(tree.num_nodes[0]) >= 3  # the root was expanded into two thoughts

    from o1jax.model import lora
    from o1jax.parallel.mesh import make_mesh
    from o1jax.rl.experience import experience_width, tree_to_experiences
    from o1jax.rl.ppo import PPOConfig, PPOTrainer

    cfg, params, fmt, search = ns["cfg"], ns["params"], ns["fmt"], ns["search"]
    prompts, lengths = ns["prompts"], ns["lengths"]
    width = experience_width(fmt, prompts.shape[1], search)
    exps = tree_to_experiences(tree, prompts, lengths, fmt, search, 0.99, 0.95, width)
    valid = np.flatnonzero(np.asarray(exps.valid))
    assert len(valid) == int(tree.num_nodes[0]) - 1  # one experience per non-root node
    batch = jax.tree.map(lambda x: x[np.resize(valid, 8)], exps)  # 8 rows for 8 devices
    adapter = lora.init(cfg, jax.random.key(3), lora.LoRAConfig(rank=4, alpha=8))
    trainer = PPOTrainer(
        cfg,
        params,
        adapter,
        PPOConfig(epochs=1),
        make_mesh(),
        rating_tokens=(fmt.positive_rating, fmt.negative_rating),
    )
    metrics, priorities = trainer.update(batch, np.ones(8, np.float32))
    assert float(metrics["first/ratio_mean"]) == 1.0
    assert np.isfinite(float(metrics["loss"])) and priorities.shape == (8,)
