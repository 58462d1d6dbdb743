"""The protocol's own controls on one checkpoint (docs/studies.md, protocol calibration): a
snapshot tool like ``lcredit.probe``, run by the protocol_calibration study's calibrate stage."""
from __future__ import annotations

import torch
from omegaconf import OmegaConf

from lcredit.build import build_rule
from lcredit.diagnostics import diagnose, measure
from lcredit.diagnostics.measure import evaluation_batches
from lcredit.models.base import exact_credit
from lcredit.options import Count, checked
from lcredit.snapshots import load_checkpoint, restore


@checked()
def calibrate(ckpt_path, null_draws: Count = 20, data_root: str | None = None) -> dict:
    """The protocol's own controls on one checkpoint (docs/studies.md, protocol calibration): the
    rule's gamma against ``null_draws`` fresh feedback draws; rho of backprop's gradient (≈ 1)
    and of random vectors (≈ 0); and the full protocol on a randomly initialised network of
    the same settings (its verdict should be trustworthy apart from (d), which needs a run)."""
    snapshot, task, cfg = restore(load_checkpoint(ckpt_path), data_root)
    p = cfg.protocol
    opts = OmegaConf.to_container(p.measure, resolve=True) | {"null_draws": int(null_draws),
                                                               "seed": int(p.seed)}
    eval_b, stab_b, rho_b = evaluation_batches(
        task.x_train, task.y_train, int(p.eval_batches), int(p.stability_batches),
        int(p.batch_size), int(p.seed), int(opts.get("rho_samples", 0)))
    loss = snapshot.task_loss

    def bp(model, x, y):
        return exact_credit(model, x, y, loss)[1]

    gen = torch.Generator().manual_seed(int(p.seed) + 1)

    def noise(model, x, y):
        return [torch.randn(g.shape, generator=gen, dtype=g.dtype).to(g.device)
                for g in exact_credit(model, x, y, loss)[1]]

    snapshot.eval()
    own = measure(None, eval_b, snapshot, rho_batches=rho_b, **opts)
    kw = dict(loss_fn=snapshot.per_sample_loss, rho_batches=rho_b, **opts)
    with_bp = measure(snapshot.model, eval_b, bp, **kw)
    with_noise = measure(snapshot.model, eval_b, noise, **kw)
    torch.manual_seed(int(cfg.seed))
    fresh = build_rule(cfg, task)
    fresh.eval()
    th = OmegaConf.to_container(p.thresholds, resolve=True)
    report = diagnose(None, eval_b, credit=fresh, thresholds=th, stability_batches=stab_b,
                      rho_batches=rho_b, epoch=0, **opts)

    def layers(m, keys):
        return [{k: row.get(k) for k in ("layer", *keys)} for row in m["layers"]]

    return {"snapshot": str(ckpt_path), "snapshot_rule": snapshot.name,
            "snapshot_epoch": snapshot.history[-1]["epoch"] if snapshot.history else 0,
            "null_draws": int(null_draws),
            "rule": {"layers": layers(own, ("gamma", "null_gamma", "null_gamma_std")),
                     "aggregates": own["aggregates"]},
            "bp_rho": {"layers": layers(with_bp, ("rho", "rho_se")),
                       "rho_0": with_bp["aggregates"].get("rho_0"),
                       "rho_deep": with_bp["aggregates"].get("rho_deep")},
            "random_rho": {"layers": layers(with_noise, ("rho", "rho_se")),
                           "rho_0": with_noise["aggregates"].get("rho_0"),
                           "rho_deep": with_noise["aggregates"].get("rho_deep")},
            "random_init": report.to_dict()}
