"""Every recipe of the ptq group shares one schema, so a sweep over recipes accepts any ptq.* override."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from saq.cli.task import config_dir, register_resolvers
from saq.config.schema import ReconConfig

RECIPES = sorted(p.stem for p in (Path(config_dir()) / "ptq").glob("*.yaml"))


def test_every_recipe_has_the_recon_and_pcc_keys():
    register_resolvers()
    with initialize_config_dir(config_dir(), version_base=None):
        keys = {}
        for recipe in RECIPES:
            cfg = compose("ptq", overrides=[f"ptq={recipe}", "ptq.recon.iters=7", "ptq.recon.final_attn_iters=3",
                                            "ptq.pcc.theta=0.3"])
            assert cfg.ptq.recon.iters == 7 and cfg.ptq.pcc.theta == 0.3, recipe
            keys[recipe] = (set(cfg.ptq.recon), set(cfg.ptq.pcc))
    assert len(set(map(str, keys.values()))) == 1  # the same keys everywhere
    recon_keys = next(iter(keys.values()))[0]
    assert set(ReconConfig.__dataclass_fields__) <= recon_keys  # every schema key is in every recipe


@pytest.mark.slow
def test_sweep_over_recipes_with_a_recon_override(tmp_path):
    """Hydra composes a multirun's base config with the default recipe: the override must fit it too."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "saq.ptq", "-m", "debug=fast", "ptq=fp,minmax",
                           "ptq.recon.iters=5", "eval.side_by_side=0", f"hydra.sweep.dir={tmp_path}"],
                          capture_output=True, text=True, cwd=Path(config_dir()).parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2/2 jobs completed" in proc.stdout
