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
from lcredit.train import build_rule, fit_task

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import reference  # noqa: E402

STEPS = 20
CASES = {  # reference loop -> lcredit overrides
    "bp": ["method=bp"], "frozen": ["method=frozen"], "dfa": ["method=dfa"],
    "fa_blockwise": ["method=fa", "method.variant=blockwise"],
    "fa_layerwise": ["method=fa", "method.variant=layerwise"],
}


def feedback_of(rule, name):
    """The rule's own fixed matrices, in the form the reference step takes."""
    if name == "dfa":
        return [rule.feedback(l).clone() for l in range(len(rule.state_shapes))]
    if name == "fa_blockwise":
        return [getattr(rule, f"feedback_{l}").clone() for l in range(len(rule.state_shapes) - 1)]
    if name == "fa_layerwise":
        return {layer: getattr(rule, buf).clone() for layer, buf in rule._sites}
    return None


def setup(tmp_path, name):
    cfg = compose_cfg(tmp_path, *CASES[name], "model.d=16", "model.depth=3",
                      "model.mlp_ratio=2.0", "data.n_train=640", "data.batch_size=32")
    torch.manual_seed(0)
    task = fit_task(cfg, build_task(cfg.data))
    rule = build_rule(cfg, task).double()
    x, y = task.x_train.double(), task.y_train
    batches = [(x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32]) for i in range(STEPS)]
    return rule, batches


def run_lcredit(rule, batches):
    """The rule's training step (training_step without the Lightning plumbing)."""
    opt = rule.configure_optimizers()
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        rule.compute_gradients(x, y)
        rule.clip_block_gradients()
        opt.step()
    return dict(rule.model.named_parameters())


def run_reference(name, model, feedback, batches):
    opt = torch.optim.Adam(reference.trained_parameters(name, model), lr=1e-3, weight_decay=0.0)
    for x, y in batches:
        reference.STEPS[name](model, feedback, opt, x, y)
    return dict(model.named_parameters())


@pytest.mark.parametrize("name", list(CASES))
def test_lcredit_matches_the_plain_reference_loop(tmp_path, name):
    rule, batches = setup(tmp_path, name)
    model = copy.deepcopy(rule.model)
    feedback = feedback_of(rule, name)
    if name == "fa_layerwise":  # keyed by the copy's layers
        layers = dict(rule.model.named_modules())
        copies = dict(model.named_modules())
        feedback = {copies[n]: feedback[m] for n, m in layers.items() if m in feedback}
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    ref = run_reference(name, model, feedback, batches)
    got = run_lcredit(rule, batches)
    assert got.keys() == ref.keys()
    moved = False
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-11, msg=k)
        moved |= not torch.equal(ref[k], start[k])
    assert moved
    if name == "frozen":  # the blocks stay where they started
        assert all(torch.equal(ref[k], start[k]) for k in ref if k.startswith("blocks"))


def test_the_oracle_catches_a_wrong_credit_scale(tmp_path):
    """The control: dfa's loop with its feedback 1.5x too large is told apart."""
    rule, batches = setup(tmp_path, "dfa")
    model = copy.deepcopy(rule.model)
    ref = run_reference("dfa", model, [B * 1.5 for B in feedback_of(rule, "dfa")], batches)
    got = run_lcredit(rule, batches)
    assert any(not torch.allclose(got[k], ref[k], rtol=1e-6, atol=1e-8) for k in ref)
