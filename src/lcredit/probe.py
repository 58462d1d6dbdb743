"""Frozen-snapshot credit recovery: ``python -m lcredit.probe ckpt=<path> rules=[dfa,sb,cb,vec]``.

Trains each credit estimator on a frozen snapshot of a trained network (the network never
changes; only the estimator learns) and reports gamma, rho and nudge per layer on the snapshot's
own evaluation batches: how much of the true credit an estimator *can* recover from that
network, separated from whether training with it would have reached that network.
"""
from __future__ import annotations

import copy
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from lcredit.diagnostics.measure import evaluation_batches
from lcredit.cli import as_list, check_hydra_dirs, hydra_entry, quote_path_overrides, run_snapshot_tool
from lcredit.data import DeviceBatches
from lcredit.diagnostics import measure
from lcredit.errors import ConfigError
from lcredit.options import Count, Index, checked
from lcredit.rules.estimator import Estimator
from lcredit.build import CONF_DIR, build_rule

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


@checked()
def probe(ckpt_path, rules=("dfa", "sb", "cb", "vec"), steps: Index = 500,
          overrides: dict | None = None, batch_size: Count | None = None,
          data_root: str | None = None, optim: str | None = "adam") -> dict:
    from lcredit.audit import load_checkpoint, restore

    rules = as_list("rules", rules)
    overrides = overrides or {}
    labels = [split_rule(r)[0] for r in rules]
    unknown = sorted(set(overrides) - set(labels))
    if unknown:
        raise ConfigError(f"overrides.{unknown[0]}: {unknown[0]!r} is not among rules={rules}")
    ckpt = load_checkpoint(ckpt_path)
    snapshot, task, cfg = restore(ckpt, data_root)
    p = cfg.protocol
    measure_opts = OmegaConf.to_container(p.measure, resolve=True)
    eval_b, _, rho_b = evaluation_batches(task.x_train, task.y_train, int(p.eval_batches), 2,
                                          int(p.batch_size), int(p.seed),
                                          int(measure_opts.get("rho_samples", 0)))
    bs = int(batch_size or cfg.data.get("batch_size", 128))
    reference = {k: v.clone() for k, v in snapshot.model.state_dict().items()}
    out = {"snapshot": str(ckpt_path), "snapshot_rule": snapshot.name,
           "snapshot_epoch": (snapshot.history[-1]["epoch"] if snapshot.history else 0),
           "task": task.name, "steps": int(steps), "batch_size": bs,
           "optim": optim or "the snapshot run's", "overrides": overrides, "rules": {}}
    for entry in rules:
        name, method = split_rule(entry)
        rule = rule_on_snapshot(snapshot, cfg, task, method, overrides.get(name), optim)
        batches = DeviceBatches(task.x_train, task.y_train, bs, shuffle=True, seed=int(cfg.seed))
        loss = fit_estimator(rule, batches, int(steps))
        for k, v in rule.model.state_dict().items():
            if not torch.equal(v, reference[k]):  # would make every number below meaningless
                raise RuntimeError(f"probe: the snapshot changed while fitting {name} ({k})")
        m = measure(None, eval_b, rule, stability_batches=[], rho_batches=rho_b, **measure_opts)
        out["rules"][name] = {
            "estimator_loss_first_last": loss,
            "layers": [{k: row.get(k) for k in ("layer", "gamma", "rho", "nudge", "null_gamma")}
                       for row in m["layers"]],
            "aggregates": {k: m["aggregates"][k] for k in m["aggregates"] if "gamma" in k},
        }
    return out


def to_markdown(result: dict, metrics=("gamma", "rho", "nudge")) -> str:
    rules = list(result["rules"])
    depth = len(next(iter(result["rules"].values()))["layers"])
    lines = [f"# Probe of {result['snapshot']} ({result['snapshot_rule']}, epoch "
             f"{result['snapshot_epoch']}; {result['steps']} estimator steps)", ""]
    for metric in metrics:
        lines += [f"## {metric}", "", "| layer | " + " | ".join(rules) + " |",
                  "|---|" + "---|" * len(rules)]
        for l in range(depth):
            cells = [result["rules"][r]["layers"][l][metric] for r in rules]
            lines.append(f"| {l} | " + " | ".join("—" if v is None else f"{v:.3f}" for v in cells) + " |")
        lines.append("")
    lines += ["| aggregate | " + " | ".join(rules) + " |", "|---|" + "---|" * len(rules)]
    for key in ("gamma_0", "gamma_deep", "gamma_hidden"):
        cells = [result["rules"][r]["aggregates"].get(key) for r in rules]
        lines.append(f"| {key} | " + " | ".join("—" if v is None else f"{v:.3f}" for v in cells) + " |")
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="probe")
def main(cfg: DictConfig) -> None:
    run_snapshot_tool("probe", cfg, lambda: probe(cfg.ckpt, cfg.rules, cfg.steps,
                           OmegaConf.to_container(cfg.overrides, resolve=True), cfg.batch_size,
                           cfg.data_root, cfg.estimator_optim), to_markdown)


if __name__ == "__main__":
    quote_path_overrides()
    check_hydra_dirs("lcredit.probe")
    hydra_entry("lcredit.probe", main)
