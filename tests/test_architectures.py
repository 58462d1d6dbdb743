"""Every rule on every architecture through embed / blocks / readout, and the new tasks."""
from pathlib import Path

import pytest
import torch

import lcredit
from conftest import TINY_MEASURE, assert_resume_exact, compose_cfg
from lcredit.data import DeviceBatches, build_task
from lcredit.errors import ConfigError
from lcredit.build import build_rule, fit_task
from lcredit.training import train

CONF = Path(__file__).resolve().parents[1] / "conf"
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
VARIANTS = [[f"method={m}"] for m in METHODS] + [["method=fa", "method.variant=layerwise"]]
# Tiny inputs; the models at their configured (default) sizes unless noted.
ARCHS = {
    "resmlp": ["model=resmlp", "data=ladder"],
    "student": ["model=student", "data=ladder"],
    "vit_mini": ["model=vit_mini", "data=gaussian_images"],
    "small_cnn": ["model=small_cnn", "data=gaussian_images"],
    "linear_resmlp": ["model=linear_resmlp", "data=lq"],
}
TINY_DATA = {"ladder": ["data.n_train=64", "data.n_test=16"],
             "gaussian_images": ["data.n_train=64", "data.n_test=16"],
             "lq": ["data.n_train=64", "data.n_test=16"]}


def tiny(tmp_path, arch, *extra):
    data = ARCHS[arch][1].split("=")[1]
    return compose_cfg(tmp_path, *ARCHS[arch], *TINY_DATA[data], *extra)


def build(cfg):
    torch.manual_seed(0)
    task = fit_task(cfg, build_task(cfg.data))
    return build_rule(cfg, task), task


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(s.split("=")[1] for s in v))
def test_rule_x_architecture(tmp_path, arch, variant):
    cfg = tiny(tmp_path, arch, *variant)
    if arch == "small_cnn" and variant == ["method=fa"]:  # blockwise, fa's default
        with pytest.raises(ConfigError, match="layerwise"):  # dense feedback would be GBs
            build(cfg)
        return
    rule, task = build(cfg)
    x, y = task.x_train[:16], task.y_train[:16]
    # Parameters only: BatchNorm running statistics follow the data under every rule.
    before = {k: v.detach().clone() for k, v in rule.model.named_parameters()}
    opt = rule.make_optimizer()
    opt.zero_grad()
    loss, _ = rule.compute_gradients(x, y)
    opt.step()
    assert torch.isfinite(loss)
    changed = {k for k, v in rule.model.named_parameters() if not torch.equal(v, before[k])}
    assert any(k.startswith("readout") for k in changed)
    assert any(k.startswith("blocks") for k in changed) == (variant != ["method=frozen"])
    states = rule.model.states(x)
    credit = rule.credit(x, y)
    assert [a.shape for a in credit] == [h.shape for h in states]
    assert all(torch.isfinite(a).all() for a in credit)
    if variant == ["method=bp"]:
        rep = lcredit.diagnose(None, [(x, y)], credit=rule, rho_directions=2, null_draws=2)
        for row in rep.layers:
            assert row["gamma"] == pytest.approx(1, abs=1e-6), row


@pytest.mark.parametrize("arch", ["vit_mini", "small_cnn"])
def test_fa_layerwise_with_true_weights_is_bp(tmp_path, arch):
    """Through attention, convolution and normalisation layers alike."""
    cfg = tiny(tmp_path, arch, "method=fa", "method.variant=layerwise")
    fa, task = build(cfg)
    fa = fa.double()
    for layer, buf in fa._sites:
        getattr(fa, buf).copy_(layer.weight.detach())
    x, y = task.x_train[:8].double(), task.y_train[:8]
    fa.model.eval()  # BatchNorm on batch statistics would differ between the two passes' copies
    bp_cfg = tiny(tmp_path, arch, "method=bp")
    bp, _ = build(bp_cfg)
    bp = bp.double()
    bp.model.load_state_dict(fa.model.state_dict())
    bp.model.eval()
    for rule in (fa, bp):
        rule.model.zero_grad(set_to_none=True)
        rule.compute_gradients(x, y)
    for (name, p), (_, q) in zip(fa.model.named_parameters(), bp.model.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("arch,size", [
    ("vit_mini", ["model.d=32", "model.depth=2"]),
    ("small_cnn", ["model.widths=[8,16,16]", "model.fc_width=32"])])
def test_image_models_learn_digits_with_bp(make_cfg, arch, size):
    results = train(make_cfg("method=bp", f"model={arch}", "data=digits", "trainer.max_epochs=5",
                           "protocol.every_n_epochs=100", *TINY_MEASURE, *size))
    assert results["final"]["test_acc"] > 0.5, results["final"]  # chance is 0.1
    assert any("8x8 -> 32x32" in n for n in results["task_notes"])


def test_lq_costate_matches_bp_and_not_dfa(tmp_path):
    bp, task = build(tiny(tmp_path, "linear_resmlp", "method=bp"))
    batches = [(task.x_train[:64], task.y_train[:64])]
    rep = lcredit.diagnose(None, batches, credit=bp)
    for row in rep.layers:
        assert row["costate_cosine"] == pytest.approx(1, abs=1e-9), row
    dfa, _ = build(tiny(tmp_path, "linear_resmlp", "method=dfa", "model.d=128"))
    rep = lcredit.diagnose(None, batches, credit=dfa)
    assert abs(rep.aggregates["costate_cosine_deep"]) < 0.1, rep.aggregates


def test_lq_trains_as_regression(make_cfg):
    results = train(make_cfg("method=bp", "model=linear_resmlp", "data=lq",
                             "trainer.max_epochs=3", "protocol.frozen_baseline=auto"))
    h = results["history"]
    assert h[-1]["test_loss"] < h[0]["test_loss"] and h[-1]["test_acc"] is None
    assert results["frozen_baseline"] is None  # (d) compares accuracies; lq has none
    assert results["protocol"]["layers"][1]["costate_cosine"] == pytest.approx(1, abs=1e-6)


@pytest.mark.parametrize("override,needle", [
    (["model=vit_mini", "data=ladder"], "needs image input"),
    (["model=small_cnn", "data=lq"], "needs image input"),
    (["model=resmlp", "data=lq"], "model=linear_resmlp"),
    (["model=vit_mini", "data=digits", "model.heads=3"], "divisible"),
])
def test_impossible_combinations_fail_at_config_time(make_cfg, override, needle):
    with pytest.raises(ConfigError, match=needle):
        train(make_cfg(*override))


def test_image_tasks_take_the_models_shape(tmp_path):
    cfg = compose_cfg(tmp_path, "model=vit_mini", "data=digits")
    task = fit_task(cfg, build_task(cfg.data))
    assert task.input_shape == (1, 32, 32)
    cfg = compose_cfg(tmp_path, "model=resmlp", "data=digits")
    assert fit_task(cfg, build_task(cfg.data)).input_shape == (1, 8, 8)  # MLPs flatten


@pytest.mark.parametrize("data", ["ladder", "digits", "gaussian_images", "lq"])
def test_random_targets_replace_every_label(tmp_path, data):
    cfg = compose_cfg(tmp_path, f"data={data}", *TINY_DATA.get(data, []))
    task = build_task(cfg.data)
    batches = DeviceBatches(task.x_train, task.y_train, 32, shuffle=False,
                            random_targets=True, num_classes=task.num_classes)
    fake = torch.cat([y for _, y in batches])
    again = torch.cat([y for _, y in batches])
    assert torch.equal(fake, again)  # reproducible
    assert fake.shape == task.y_train.shape and fake.dtype == task.y_train.dtype
    if task.loss == "ce":
        assert fake.min() >= 0 and fake.max() < task.num_classes
        agree = (fake == task.y_train).float().mean()
        assert agree < 0.3  # ~1/C by chance
        counts = torch.bincount(fake, minlength=task.num_classes)
        assert counts.min() > 0
    else:
        assert torch.corrcoef(torch.stack([fake.flatten(), task.y_train.flatten()]))[0, 1].abs() < 0.2


@pytest.mark.parametrize("arch,extra", [
    ("vit_mini", ["model.d=32", "model.depth=2", "model.heads=2"]),
    ("small_cnn", ["model.widths=[8,8,8]", "model.fc_width=16"]),
    ("student", ["model.d=32", "model.depth=2"]),
])
def test_resume_is_exact_for_each_model(make_cfg, arch, extra):
    assert_resume_exact(make_cfg, "method=dfa", *ARCHS[arch], *extra, "data.n_train=256",
                        "data.n_test=64", "data.batch_size=64", *TINY_MEASURE)
