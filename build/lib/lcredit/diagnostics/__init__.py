"""Diagnostics: pure functions of (model, credit, batches) and the protocol verdict."""
from lcredit.diagnostics.measure import measure
from lcredit.diagnostics.protocol import DEFAULT_THRESHOLDS, Report, judge


def diagnose(model, batches, credit=None, headline_acc=None, frozen_baseline_acc=None,
             thresholds=None, **options) -> Report:
    """Measure ``model`` (anything with embed / blocks / readout) on ``batches`` and judge it.

    ``credit``: a rule (its ``credit(x, y)`` and update), a function
    ``fn(model, x, y) -> [a_0..a_L]`` (per-sample credit, called with a float64 copy of the
    model), or None to measure only what needs no credit (norms, gradient floor).
    ``headline_acc`` / ``frozen_baseline_acc``: fractions in [0, 1] for diagnostic (d).
    ``options``: rho_samples, rho_directions, rho_eps, nudge_step, null_draws, seed,
    stability_batches, loss_fn, costate, rule, epoch, first_fired.
    """
    rule_name = options.pop("rule", None) or getattr(credit, "name", None)
    epoch = options.pop("epoch", None)
    first_fired = options.pop("first_fired", None)
    if credit is not None and hasattr(credit, "model") and model is None:
        model = credit.model
    measured = measure(model, batches, credit, **options)
    return judge(measured, headline_acc, frozen_baseline_acc, thresholds, rule=rule_name,
                 epoch=epoch, first_fired=first_fired)


__all__ = ["DEFAULT_THRESHOLDS", "Report", "diagnose", "judge", "measure"]
