"""lcredit against the plain reference loops of scripts/reference.py (the loops `make bench`
times it against): from the same network, feedback and batches, 20 steps of each end with the
same parameters. A rule whose step drifted from its math (a wrong scale, a missed layer, a
credit taken at the wrong state) fails here; so does a reference that is not the rule's."""
import copy
import sys
from pathlib import Path

import pytest
import torch

from conftest import compose_cfg
from lcredit.data import build_task
from lcredit.build import build_rule, fit_task

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import reference  # noqa: E402

STEPS = 20
SEED, STEP = 7, 3  # the estimators' noise: run seed and step counter (neither the default)
CASES = {  # reference loop -> lcredit overrides
    "bp": ["method=bp"], "frozen": ["method=frozen"], "dfa": ["method=dfa"],
    "fa_blockwise": ["method=fa", "method.variant=blockwise"],
    "fa_layerwise": ["method=fa", "method.variant=layerwise"],
    "ep": ["method=ep"],
    "usf": ["method=usf"], "frsf": ["method=frsf"], "brsf": ["method=brsf"], "kp": ["method=kp"],
    "drtp": ["method=drtp"],
    "sb": ["method=sb", "method.width=16"],
    "cb": ["method=cb", "method.warmup_ratio=0", "method.width=16"],  # the rule phase
    "vec": ["method=vec", "method.width=16"],
    "blend": ["method=blend", "method.width=16"],
}
ESTIMATOR = {"sb": "predictors", "cb": "value", "vec": "field", "blend": "field"}
# What the reference loops take for granted, beyond the options form() compares with the
# original's (ep's update_at and credit; the estimators' credit_norm, predictor, bridge, field...).
ASSUMED = {"ep": {"relax": "sweep", "symmetric": False},
           **{name: {"s_type": "eT", "topdown": None, "prefit_epochs": 0, "refit_every": None,
                     "exact_top": name == "sb", "block_grad_clip": None} for name in ESTIMATOR}}
for name in ("vec", "blend"):
    ASSUMED[name] |= {"one_sided": False, "shuffle_targets": False}
ASSUMED["blend"] |= {"source": "vec", "alpha_decay": "constant", "freeze_after": None}


def feedback_of(rule, name):
    """The rule's own fixed matrices, in the form the reference step takes."""
    if name in ("dfa", "drtp"):
        return [rule.feedback(l).clone() for l in range(len(rule.state_shapes))]
    if name == "fa_blockwise":
        return [getattr(rule, f"feedback_{l}").clone() for l in range(len(rule.state_shapes) - 1)]
    if name in ("fa_layerwise", "kp"):
        return {layer: getattr(rule, buf).clone() for layer, buf in rule._sites}
    if name in ("frsf", "brsf"):
        return {layer: rule.magnitude(i, layer).clone() for i, layer in enumerate(rule._sites)}
    return None


def by_copy(rule, model, feedback):
    """A dict keyed by the rule's layers, keyed by the same layers of ``model`` (a copy)."""
    layers, copies = dict(rule.model.named_modules()), dict(model.named_modules())
    return {copies[n]: feedback[m] for n, m in layers.items() if m in feedback}


def state_of(rule, name, model):
    """The reference state for ``model`` (a copy of the rule's) taken from lcredit's rule: its
    feedback, its estimator's weights, its noise seed and step counter; the reference's
    hyperparameters checked against the rule's."""
    if name in ("fa_layerwise", "frsf"):  # keyed by the copy's layers
        return by_copy(rule, model, feedback_of(rule, name))
    if name == "brsf":
        return {"magnitude": by_copy(rule, model, feedback_of(rule, name)),
                "seed": rule.run_config["seed"], "step": rule._draws_host}
    if name == "kp":
        assert rule.kp_decay == reference.DEFAULTS["kp"]["kp_decay"]  # the yaml's default
        return {"kp_decay": rule.kp_decay, "feedback": by_copy(rule, model, feedback_of(rule, name))}
    if name not in ("ep", *ESTIMATOR):
        return feedback_of(rule, name)
    assert rule.form()["original"], rule.form()
    assert {k: getattr(rule, k) for k in ASSUMED[name]} == ASSUMED[name]
    options = {}
    if name in ESTIMATOR:
        assert rule.phase() == "rule"
        options = {"width": rule.width, "seed": rule.run_config["seed"], "step": rule._aux_host}
    state = reference.make_state(name, model, rule.num_classes, **options)
    for k, v in reference.DEFAULTS[name].items():  # the loop's defaults are the yaml's
        assert getattr(rule, k) == state[k] == options.get(k, v), k
    if name in ESTIMATOR:
        net = getattr(rule, ESTIMATOR[name])
        assert {id(q) for q in rule.estimator_parameters()} == {id(q) for q in net.parameters()}
        state["net"].load_state_dict(net.state_dict())
    if name == "cb":
        state["target"].load_state_dict(rule.value_target.state_dict())
    if name == "blend":
        state["feedback"] = feedback_of(rule, "dfa")
    return state


def setup(tmp_path, name):
    cfg = compose_cfg(tmp_path, *CASES[name], "model.d=16", "model.depth=3",
                      "model.mlp_ratio=2.0", "data.n_train=640", "data.batch_size=32")
    torch.manual_seed(0)
    task = fit_task(cfg, build_task(cfg.data))
    rule = build_rule(cfg, task).double()
    if name in ESTIMATOR:
        rule.run_config = {"seed": SEED}
        rule.seek_noise(STEP)
    if name == "brsf":
        rule.run_config = {"seed": SEED}
    x, y = task.x_train.double(), task.y_train
    batches = [(x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32]) for i in range(STEPS)]
    return rule, batches


def parameters(model, estimator):
    """The model's parameters, and the estimator's under ``aux.``."""
    named = dict(model.named_parameters())
    if estimator is not None:
        named |= {f"aux.{k}": v for k, v in estimator.named_parameters()}
    return named


def run_lcredit(rule, batches, name):
    """The rule's training step (training_step without the Lightning plumbing)."""
    opt = rule.make_optimizer()
    for x, y in batches:
        rule.update(x, y, opt)
    return parameters(rule.model, getattr(rule, ESTIMATOR[name]) if name in ESTIMATOR else None)


def run_reference(name, model, state, batches):
    opt = torch.optim.Adam(reference.param_groups(name, model, state), lr=1e-3, weight_decay=0.0)
    for x, y in batches:
        reference.STEPS[name](model, state, opt, x, y)
    return parameters(model, state["net"] if name in ESTIMATOR else None)


@pytest.mark.parametrize("name", list(CASES))
def test_lcredit_matches_the_plain_reference_loop(tmp_path, name):
    rule, batches = setup(tmp_path, name)
    model = copy.deepcopy(rule.model)
    state = state_of(rule, name, model)
    start = {k: v.detach().clone() for k, v in parameters(
        model, state["net"] if name in ESTIMATOR else None).items()}
    ref = run_reference(name, model, state, batches)
    got = run_lcredit(rule, batches, name)
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-11, msg=k)
    # every parameter moved, the blocks of frozen excepted (they stay where they started)
    moved = {k for k in ref if not torch.equal(ref[k], start[k])}
    assert moved == {k for k in ref if not (name == "frozen" and k.startswith("blocks"))}
    if name in ESTIMATOR:  # the noise counter advanced as lcredit's
        assert state["step"] == rule._aux_host == STEP + STEPS
    if name == "brsf":  # one fresh draw of the magnitudes per step
        assert state["step"] == rule._draws_host == int(rule.magnitude_draws) == STEPS


def test_the_oracle_catches_a_wrong_credit_scale(tmp_path):
    """The control: dfa's loop with its feedback 1.5x too large is told apart."""
    rule, batches = setup(tmp_path, "dfa")
    model = copy.deepcopy(rule.model)
    ref = run_reference("dfa", model, [B * 1.5 for B in feedback_of(rule, "dfa")], batches)
    got = run_lcredit(rule, batches, "dfa")
    assert any(not torch.allclose(got[k], ref[k], rtol=1e-6, atol=1e-8) for k in ref)


def test_the_oracle_catches_other_noise(tmp_path):
    """The control for the noise: vec's loop one step ahead in its draws is told apart."""
    rule, batches = setup(tmp_path, "vec")
    model = copy.deepcopy(rule.model)
    state = state_of(rule, "vec", model)
    state["step"] += 1
    ref = run_reference("vec", model, state, batches)
    got = run_lcredit(rule, batches, "vec")
    assert any(not torch.allclose(got[k], ref[k], rtol=1e-6, atol=1e-8) for k in ref)


def _shapes(value):
    """Every tensor's shape (modules' by their state_dict), other values as they are."""
    if isinstance(value, torch.Tensor):
        return value.shape
    if isinstance(value, torch.nn.Module):
        return {k: v.shape for k, v in value.state_dict().items()}
    if isinstance(value, dict):
        return {k: _shapes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shapes(v) for v in value]
    return value


@pytest.mark.parametrize("name", list(CASES))
def test_a_fresh_state_is_the_rules_at_the_yamls_defaults(tmp_path, name):
    """make_state (the bench's fresh runs, float32) builds what lcredit's rule holds at the
    yaml's defaults (the estimator's width included), and a step runs on it."""
    cfg = compose_cfg(tmp_path, *[o for o in CASES[name] if not o.startswith("method.width")],
                      "model.d=16", "model.depth=3", "model.mlp_ratio=2.0", "data.n_train=64")
    task = fit_task(cfg, build_task(cfg.data))
    rule = build_rule(cfg, task)
    model = copy.deepcopy(rule.model)
    fresh = reference.make_state(name, model, rule.num_classes, torch.Generator().manual_seed(0))
    if name in ESTIMATOR or name == "brsf":
        rule.run_config = {"seed": 0}
    assert _shapes(fresh) == _shapes(state_of(rule, name, model))
    opt = torch.optim.Adam(reference.param_groups(name, model, fresh), lr=1e-3)
    reference.STEPS[name](model, fresh, opt, task.x_train[:32], task.y_train[:32])
    assert all(torch.isfinite(q).all() for g in opt.param_groups for q in g["params"])
