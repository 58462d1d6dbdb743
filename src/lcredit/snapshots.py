"""A saved run as something to measure and to build on: its checkpoint read back (the rule with
its state, the task, the config), a fresh rule around its network, and an estimator fitted on the
frozen network. The tools (audit, probe, exploit, the study's calibration) share these."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from lcredit.build import CONF_DIR, build_rule, fit_task
from lcredit.config import read_checkpoint
from lcredit.data import DeviceBatches, build_task
from lcredit.errors import ConfigError
from lcredit.rules.estimator import Estimator


def load_checkpoint(path) -> dict:
    return read_checkpoint(path, "ckpt")


def restore(ckpt: dict, data_root=None):
    """The run's rule with the checkpoint's state, its task, and its config."""
    cfg = OmegaConf.create(ckpt["lcredit"]["config"])
    if data_root is not None:
        with open_dict(cfg):
            if "root" in cfg.data:
                cfg.data.root = str(data_root)
    task = fit_task(cfg, build_task(cfg.data))
    torch.manual_seed(int(cfg.seed))
    rule = build_rule(cfg, task)
    unrecorded = [k for k in type(rule).ORIGINAL if k not in cfg.method]
    if unrecorded:  # an older lcredit's checkpoint: which form ran is not known
        raise ConfigError(
            f"refusing to audit: the checkpoint's config does not record "
            f"{', '.join('method.' + k for k in unrecorded)} (written before those options "
            f"existed), so the form of its {rule.name!r} rule is unknown; lcredit will not guess.")
    state = ckpt["state_dict"]
    expected = rule.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise ConfigError(
            f"refusing to audit: the checkpoint lacks state the {rule.name!r} rule needs for its "
            f"credit: {', '.join(missing[:6])}{' …' if len(missing) > 6 else ''}. lcredit will "
            f"not substitute backprop's gradient (that would report a perfect alignment).")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise ConfigError(f"refusing to audit: the checkpoint has state the {rule.name!r} rule "
                          f"does not know: {', '.join(unexpected[:6])}")
    rule.load_state_dict(state, strict=True)
    rule.on_load_checkpoint(ckpt)
    return rule, task, cfg


def group_config(group: str, name: str, what: str) -> DictConfig:
    """conf/<group>/<name>.yaml, or a ConfigError naming ``what`` and the known choices."""
    folder = Path(CONF_DIR) / group
    path = folder / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise ConfigError(f"{what}: no conf/{group}/{name}.yaml (known: {known})")
    return OmegaConf.load(path)


def method_config(name: str, overrides=None) -> DictConfig:
    return OmegaConf.merge(group_config("method", name, f"rule {name!r}"), overrides or {})


def split_rule(entry: str) -> tuple[str, str]:
    """``label:method`` names one rule twice with other options (``cb_deltaL:cb`` with
    overrides.cb_deltaL.s_type=deltaL); a bare name is its own label."""
    label, _, method = str(entry).partition(":")
    return label, (method or label)


def rule_on_snapshot(snapshot, cfg: DictConfig, task, name: str, overrides=None, optim=None):
    """A fresh ``name`` rule wrapped around a copy of the snapshot's network, its feedback and
    estimator initialised from the run's seed (so a dfa rule on a dfa snapshot has the
    snapshot's own feedback). ``optim``: a conf/optim name for the estimator's optimizer
    (None: the snapshot run's)."""
    run_cfg = copy.deepcopy(cfg)
    with open_dict(run_cfg):
        run_cfg.method = method_config(name, overrides)
        if optim is not None:
            run_cfg.optim = group_config("optim", optim, f"estimator_optim={optim!r}")
    torch.manual_seed(int(cfg.seed))
    rule = build_rule(run_cfg, task)
    rule.model.load_state_dict(snapshot.model.state_dict())
    rule.run_config = OmegaConf.to_container(run_cfg, resolve=True)
    return rule


def fit_estimator(rule, batches: DeviceBatches, steps: int) -> list[float]:
    """``steps`` estimator-only updates on the frozen network; returns the estimator loss of
    the first and last tenth of the steps (mean over each)."""
    if not isinstance(rule, Estimator) or steps == 0:
        return []
    rule.updates_model = lambda: False   # the snapshot stays frozen: only the estimator learns
    # ... in eval mode, as the diagnostics measure it (BatchNorm on its running statistics).
    was_training = rule.model.training
    rule.model.eval()
    opt = rule.make_optimizer()
    losses, done = [], 0
    while done < steps:
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            before = rule._aux_sums[0].clone()  # on device: no host sync per step
            rule.compute_gradients(x, y)
            opt.step()
            rule.after_step()
            losses.append(rule._aux_sums[0] - before)
            done += 1
            if done == steps:
                break
        batches.sampler.set_epoch(batches.sampler.epoch + 1)
    del rule.updates_model
    rule.model.train(was_training)
    losses = torch.stack(losses).tolist()
    k = max(1, steps // 10)
    return [sum(losses[:k]) / k, sum(losses[-k:]) / k]
