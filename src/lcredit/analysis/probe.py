"""Frozen-snapshot credit recovery: ``python -m lcredit.probe ckpt=<path> rules=[dfa,sb,cb,vec]``.

Trains each credit estimator on a frozen snapshot of a trained network (the network never
changes; only the estimator learns) and reports gamma, rho and nudge per layer on the snapshot's
own evaluation batches: how much of the true credit an estimator *can* recover from that
network, separated from whether training with it would have reached that network.
"""
from __future__ import annotations

import torch
from omegaconf import OmegaConf

from lcredit.cli import as_list
from lcredit.data import DeviceBatches
from lcredit.diagnostics import measure
from lcredit.diagnostics.measure import evaluation_batches
from lcredit.errors import ConfigError
from lcredit.options import Count, Index, checked
from lcredit.snapshots import fit_estimator, load_checkpoint, restore, rule_on_snapshot, split_rule


@checked()
def probe(ckpt_path, rules=("dfa", "sb", "cb", "vec"), steps: Index = 500,
          overrides: dict | None = None, batch_size: Count | None = None,
          data_root: str | None = None, optim: str | None = "adam") -> dict:
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
