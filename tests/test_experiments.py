"""docs/studies.md studies as Hydra experiments: every swept value builds a rule on every sweep axis."""
from pathlib import Path

import pytest
import torch

from conftest import CONF, compose_cfg
from lcredit.data import build_task
from lcredit.build import build_rule, fit_task

EXPERIMENTS = sorted(p.stem for p in (Path(CONF) / "experiment").glob("*.yaml"))


def swept_values(name):
    """Every arm once and every axis value once, of every training stage at the paper scale:
    the override lists that together cover each value the study sweeps."""
    from lcredit.study import compose_job, expand, study_node

    jobs = [j for j in expand(study_node(compose_job(name, [])), "paper") if j.kind == "train"]
    seen, out = set(), []
    for j in jobs:
        keys = [("arm", j.stage, j.arm)] + [("axis", j.stage, a, v) for a, v in j.labels.items()]
        if any(k not in seen for k in keys):
            seen.update(keys)
            out.append(j.overrides)
    return out


def small_data(tmp_path, monkeypatch, name):
    """Overrides that keep the experiment's task small: fewer synthetic samples, or for the
    torchvision sets a data root of tiny files in their genuine on-disk formats."""
    data = compose_cfg(tmp_path, f"experiment={name}", "++study.arm=x").data
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
    params = swept_values(name)
    assert params, f"experiment {name} sweeps nothing"
    small = small_data(tmp_path, monkeypatch, name)
    for overrides in params:
        cfg = compose_cfg(tmp_path, f"experiment={name}", *overrides, "++study.arm=x", *small)
        torch.manual_seed(0)
        task = fit_task(cfg, build_task(cfg.data))
        rule = build_rule(cfg, task)
        x, y = task.x_train[:8], task.y_train[:8]
        assert len(rule.credit(x, y)) == len(rule.model.blocks) + 1, overrides
        loss, _ = rule.compute_gradients(x, y)  # the update, estimator training included
        assert torch.isfinite(loss), overrides


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_tool_stage_takes_its_options(name):
    """A probe / exploit / calibrate stage's options are the tool's arguments (a misspelt one
    would fail only after hours of training the stage before it)."""
    import inspect

    from lcredit.exploit import exploit
    from lcredit.probe import probe
    from lcredit.study import _tool_options, calibrate, compose_job, expand, study_node

    tools = {"probe": probe, "exploit": exploit, "calibrate": calibrate}
    for scale in ("paper", "smoke"):
        for job in expand(study_node(compose_job(name, [f"scale={scale}"])), scale):
            if job.kind in tools:
                inspect.signature(tools[job.kind]).bind("ckpt", **_tool_options(job))
