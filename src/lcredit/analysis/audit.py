"""Post-hoc protocol audit of any checkpoint: ``python -m lcredit.audit ckpt=<path>``.

Rebuilds the run's task, model and rule from the config saved in the checkpoint, restores the
whole state strictly, and measures on the same fixed evaluation batches the run used, so the
report equals the in-run one. A checkpoint without the state a rule's credit needs (its
feedback matrices, say) is refused: substituting backprop's own gradient would report a
perfect alignment of 1.0.
"""
from __future__ import annotations

from omegaconf import OmegaConf, open_dict

from lcredit import baseline
from lcredit.callbacks.protocol import saved_state
from lcredit.diagnostics import Report, diagnose
from lcredit.diagnostics.measure import evaluation_batches
from lcredit.diagnostics.protocol import FrozenBaseline, check_thresholds
from lcredit.errors import ConfigError
from lcredit.options import checked
from lcredit.snapshots import load_checkpoint, restore


@checked()
def audit(ckpt_path, thresholds: dict | None = None, frozen_baseline: FrozenBaseline = None,
          data_root: str | None = None) -> Report:
    thresholds = {k: v for k, v in dict(thresholds or {}).items() if v is not None}
    check_thresholds(thresholds, "thresholds")  # the declaration train() holds them to
    ckpt = load_checkpoint(ckpt_path)
    rule, task, cfg = restore(ckpt, data_root)
    p = cfg.protocol
    history = rule.history
    if not history:
        raise ConfigError(f"ckpt={ckpt_path}: the run finished no epoch; nothing to audit")
    epoch, headline = history[-1]["epoch"], history[-1].get("test_acc")
    fb = ckpt["lcredit"].get("frozen_baseline")
    if frozen_baseline is not None:
        with open_dict(cfg):
            cfg.protocol.frozen_baseline = frozen_baseline
        fb = baseline.resolve(cfg, train_fn=_no_training)
    measure = OmegaConf.to_container(p.measure, resolve=True)
    eval_b, stab_b, rho_b = evaluation_batches(
        task.x_train, task.y_train, int(p.eval_batches), int(p.stability_batches),
        int(p.batch_size), int(p.seed), int(measure.get("rho_samples", 0)))
    th = dict(OmegaConf.to_container(p.thresholds, resolve=True)) | thresholds
    # first_fired from the run: the audit of the last state must not forget earlier firings.
    first = saved_state(ckpt).get("first_fired")
    return diagnose(None, eval_b, credit=rule, headline_acc=headline,
                    frozen_baseline_acc=baseline.accuracy_at(fb, epoch, headline), thresholds=th,
                    stability_batches=stab_b, rho_batches=rho_b, epoch=epoch,
                    first_fired=first, seed=int(p.seed), **measure)


def _no_training(cfg):
    raise ConfigError("audit: frozen_baseline=auto would train a frozen run, and an audit only "
                      "reads; give a number or a frozen run's results.json (e.g. from "
                      "`python -m lcredit.train method=frozen ...`)")


def to_markdown(result: dict) -> str:
    report = Report.from_dict(result)
    return report.to_markdown() + "\n" + report.template()
