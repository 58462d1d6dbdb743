"""lcredit.Protocol in a user's own Lightning code: modules written here, with nothing from
lcredit in their class bodies, trained by a plain Trainer on a plain DataLoader."""
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lcredit
from lcredit import Protocol
from lcredit.data.synthetic import ladder


# ---------------------------------------------------------------- the user's code
class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, h):
        return h + self.fc2(F.gelu(self.fc1(self.ln(h))))


class Net(L.LightningModule):
    """A residual MLP trained by direct feedback alignment (its own fixed random matrices) or
    by backprop (rule="bp")."""

    def __init__(self, d_in=16, d=32, depth=4, classes=10, rule="dfa", lr=1e-3):
        super().__init__()
        self.automatic_optimization = False
        self.rule, self.lr = rule, lr
        self.embed = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.readout = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, classes))
        g = torch.Generator().manual_seed(0)
        self.register_buffer("B", torch.randn(depth + 1, classes, d, generator=g) / d**0.5)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.readout(h)

    def lcredit_credit(self, x, y):
        """DFA's per-sample credit a_l = e B_l for h_0..h_L (what the protocol audits)."""
        with torch.no_grad():
            logits = self(x)
            e = logits.softmax(1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)
        return [e @ self.B[l].to(e.dtype) for l in range(len(self.blocks) + 1)]

    def training_step(self, batch, _):
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()
        if self.rule == "bp":
            loss = F.cross_entropy(self(x), y)
            self.manual_backward(loss)
        else:
            credit = self.lcredit_credit(x, y)
            h = self.embed(x)
            surrogate = (h * credit[0]).sum()
            for l, block in enumerate(self.blocks):
                h = block(h.detach())
                surrogate = surrogate + (h * credit[l + 1]).sum()
            loss = F.cross_entropy(self.readout(h.detach()), y)
            self.manual_backward(loss + surrogate / len(x))
        opt.step()
        self.log("train_loss", loss)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def loaders(n_train=2048, seed=0):
    task = ladder(d=16, teacher_gain=2.0, n_train=n_train, n_test=512, seed=seed)
    train = DataLoader(TensorDataset(task.x_train, task.y_train), batch_size=128, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    val = DataLoader(TensorDataset(task.x_test, task.y_test), batch_size=512)
    return train, val


def fit(net, callbacks, epochs, tmp_path, **kw):
    torch.manual_seed(0)
    trainer = L.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, **kw)
    trainer.fit(net, *loaders())
    return trainer


QUICK = {"rho_samples": 64, "rho_directions": 4, "null_draws": 2}


# ---------------------------------------------------------------- the tests
def test_a_dfa_module_stops_at_the_first_epoch_its_growth_crosses_a(tmp_path):
    torch.manual_seed(0)
    watch = Protocol(blocks="blocks.*", abort={"enabled": False}, measure=QUICK)
    fit(Net(), [watch], 6, tmp_path / "watch", enable_checkpointing=False)
    growth = [r["diagnostics"]["a"]["value"] for r in watch.reports]
    assert [r["epoch"] for r in watch.reports] == [1, 2, 3, 4, 5, 6]  # every epoch, cheaply
    assert watch.reports[4]["kind"] == "full" and "gamma" in watch.reports[4]["layers"][1]
    # a threshold the run crosses after its second epoch
    a = max(growth[:2]) * 1.0001
    first = next((e for e, g in zip(range(1, 7), growth) if g > a), None)
    assert first is not None and first > 2, growth

    torch.manual_seed(0)
    stop = Protocol(blocks="blocks.*", thresholds={"a": a}, measure=QUICK)
    trainer = fit(Net(), [stop], 6, tmp_path / "stop", enable_checkpointing=False)
    assert stop.aborted["epoch"] == first and stop.aborted["diagnostics"] == ["a"]
    assert trainer.current_epoch == first  # it trained no epoch after
    assert [r["diagnostics"]["a"]["value"] for r in stop.reports] == pytest.approx(growth[:first])


def test_the_hooked_measurement_equals_diagnose_on_the_module_itself(tmp_path):
    """The module has embed / blocks / readout attributes, so lcredit.diagnose measures it
    directly; the callback, through hooks only, must give the same per-layer values."""
    net = Net()
    cb = Protocol(blocks=["blocks.0", "blocks.1", "blocks.2", "blocks.3"], measure=QUICK,
                  abort={"enabled": False})
    fit(net, [cb], 1, tmp_path, enable_checkpointing=False)
    report = cb.last_report
    direct = lcredit.diagnose(net, cb._batches[0], credit=lambda m, x, y: m.lcredit_credit(x, y),
                              **QUICK)
    for hooked, ref in zip(report.layers, direct.layers):
        assert hooked["hidden_norm"] == pytest.approx(ref["hidden_norm"], rel=1e-9)
        assert hooked["bp_grad_norm"] == pytest.approx(ref["bp_grad_norm"], rel=1e-9)
        assert hooked["gamma"] == pytest.approx(ref["gamma"], rel=1e-9)
    assert report.diagnostics["a"]["value"] == pytest.approx(direct.diagnostics["a"]["value"])


def test_the_same_module_trained_by_backprop_is_trustworthy(tmp_path):
    train, val = loaders()
    frozen = lcredit.frozen_baseline(Net(rule="bp"), (train, val), blocks="blocks.*", epochs=4)
    cb = Protocol(blocks="blocks.*", measure=QUICK, frozen_baseline=frozen)
    fit(Net(rule="bp"), [cb], 4, tmp_path, enable_checkpointing=False)
    assert cb.aborted is None
    last = cb.last_report
    assert last.verdict == "trustworthy", last.reasons
    assert last.diagnostics["d"]["measured"] and last.diagnostics["d"]["value"] > 2.0
    assert last.aggregates["gamma_hidden"] < 0.5  # measured against DFA's credit it exposes


def test_resnet18_is_measured_through_hooks(tmp_path):
    torchvision = pytest.importorskip("torchvision")

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torchvision.models.resnet18(num_classes=10)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 32, 32, generator=g), torch.randint(10, (32,), generator=g))
    cb = Protocol(blocks=["net.layer1", "net.layer2", "net.layer3", "net.layer4"], eval_batches=1)
    trainer = L.Trainer(max_epochs=1, callbacks=[cb], logger=False, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(Classifier(), DataLoader(data, batch_size=16))
    report = cb.last_report
    assert len(report.layers) == 5  # h_0 (layer1's input) .. h_4
    assert all(math.isfinite(r["hidden_norm"]) and r["hidden_norm"] > 0 for r in report.layers)
    assert report.diagnostics["b"]["measured"] and report.diagnostics["b"]["value"] > 0


def test_a_resumed_run_restores_the_callbacks_state(tmp_path):
    cb = Protocol(blocks="blocks.*", measure=QUICK, abort={"enabled": False})
    first = fit(Net(), [cb], 2, tmp_path / "a")
    ckpt = first.checkpoint_callback.best_model_path or first.checkpoint_callback.last_model_path
    resumed = Protocol(blocks="blocks.*", measure=QUICK, abort={"enabled": False})
    trainer = L.Trainer(max_epochs=3, callbacks=[resumed], logger=False, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path / "b")
    trainer.fit(Net(), *loaders(), ckpt_path=ckpt)
    assert [r["epoch"] for r in resumed.reports] == [1, 2, 3]
    def values(reports):  # (c)'s nan is not equal to itself: compare what was measured
        return [(r["epoch"], r["diagnostics"]["a"]["value"], r["diagnostics"]["b"]["value"])
                for r in reports]

    assert values(resumed.reports[:2]) == values(cb.reports)


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(lcredit.errors.ConfigError, match=r"^protocol\.every_n_epochs=0"):
        Protocol(blocks="blocks.*", every_n_epochs=0)
    with pytest.raises(lcredit.errors.ConfigError, match=r"^protocol\.cheap_every=nan"):
        Protocol(blocks="blocks.*", cheap_every=float("nan"))
    with pytest.raises(lcredit.errors.ConfigError, match=r"did you mean blocks\.0"):
        from lcredit.diagnostics.hooked import find_blocks
        find_blocks(Net(), "block.0")


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    pytest.importorskip("torchvision")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- protocol-example:start -->\n```python\n(.*?)```", readme, re.S)
    assert block, "the README lost its Protocol example"
    monkeypatch.chdir(tmp_path)  # Lightning writes its logs and checkpoints under the cwd
    scope = {}
    exec(compile(block.group(1), "README.md", "exec"), scope)
    protocol = scope["protocol"]
    assert [r["epoch"] for r in protocol.reports] == [1, 2]
    assert protocol.reports[-1]["verdict"] in ("trustworthy", "walk back")


def test_c_from_the_modules_own_steps_and_from_a_block_update_function(tmp_path):
    """(c) on a module with no credit: from the parameter changes its optimizer makes on K
    steps; with block_update=, from that function on the evaluation batches. Both equal the
    mean pairwise cosine computed the long way."""
    from lcredit.callbacks.protocol import _StepDirections
    from lcredit.diagnostics.metrics import pairwise_mean_cosine

    g = torch.Generator().manual_seed(0)
    vecs = [[torch.randn(50, generator=g), torch.randn(30, generator=g)] for _ in range(6)]
    steps = _StepDirections(2)
    for v in vecs:
        steps.add(v)
    s = steps.stability()
    assert s["value"] == pytest.approx(pairwise_mean_cosine([torch.cat(v) for v in vecs]), abs=1e-9)
    assert s["per_block"][1] == pytest.approx(pairwise_mean_cosine([v[1] for v in vecs]), abs=1e-9)

    class NoCredit(Net):  # a module that exposes no credit: norms, (a), (b) and (c) only
        lcredit_credit = None

    net = NoCredit(rule="bp")
    own = Protocol(blocks="blocks.*", every_n_epochs=2, stability_batches=4,
                   abort={"enabled": False})
    fit(net, [own], 2, tmp_path / "own", enable_checkpointing=False)
    stab = own.last_report.extra["stability"]
    assert stab["source"] == "optimizer steps" and stab["k"] == 4
    assert -1 <= own.last_report.diagnostics["c"]["value"] <= 1
    assert own.reports[0]["kind"] == "cheap" and own.reports[1]["kind"] == "full"
    assert "gamma" not in own.last_report.layers[1]  # (c) needs no credit; gamma does

    def update(module, x, y):  # backprop's gradient of each block
        module.zero_grad()
        F.cross_entropy(module(x), y).backward()
        return [[p.grad.clone() for p in b.parameters()] for b in module.blocks]

    fn = Protocol(blocks="blocks.*", every_n_epochs=1, stability_batches=3, block_update=update,
                  abort={"enabled": False})
    net = Net(rule="bp")
    fit(net, [fn], 1, tmp_path / "fn", enable_checkpointing=False)
    vecs = [torch.cat([torch.cat([t.flatten() for t in b]) for b in update(net, x, y)])
            for x, y in fn._batches[1][:3]]
    assert fn.last_report.extra["stability"]["source"] == "block_update"
    assert fn.last_report.diagnostics["c"]["value"] == pytest.approx(pairwise_mean_cosine(vecs), abs=1e-6)
