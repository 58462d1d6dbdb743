"""SPEC §7 studies as Hydra experiments: every swept value builds a rule on every sweep axis."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import CONF, compose_cfg
from lcredit.data import build_task
from lcredit.train import build_rule, fit_task

EXPERIMENTS = sorted(p.stem for p in (Path(CONF) / "experiment").glob("*.yaml"))


def sweep_params(name):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
    return {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}


def small_data(tmp_path, monkeypatch, name):
    """Overrides that keep the experiment's task small: fewer synthetic samples, or for the
    torchvision sets a data root of tiny files in their genuine on-disk formats."""
    data = compose_cfg(tmp_path, f"experiment={name}").data
    if "n_train" in data:
        return ["data.n_train=64", "data.n_test=16"]
    import numpy as np
    import torchvision.datasets.cifar as tv_cifar
    from test_vision_data import WRITERS

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    root = tmp_path / "data"
    WRITERS[data.name][0](root, np.random.default_rng(0))
    return [f"paths.data_root={root}"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_swept_value_builds(tmp_path, monkeypatch, name):
    params = sweep_params(name)
    assert params, f"experiment {name} sweeps nothing"
    small = small_data(tmp_path, monkeypatch, name)
    for key, values in params.items():
        for value in values:
            cfg = compose_cfg(tmp_path, f"experiment={name}", f"{key}={value}", *small)
            torch.manual_seed(0)
            task = fit_task(cfg, build_task(cfg.data))
            rule = build_rule(cfg, task)
            x, y = task.x_train[:8], task.y_train[:8]
            assert len(rule.credit(x, y)) == len(rule.model.blocks) + 1, (key, value)
            loss, _ = rule.compute_gradients(x, y)  # the update, estimator training included
            assert torch.isfinite(loss), (key, value)
