"""trainer.compile: the model's embed, blocks and readout through torch.compile (inductor on
this CPU; CUDA graphs with reduce-overhead on a GPU). The compiled step is the eager step's
math: the same parameters after a few steps, up to float32 rounding of fused kernels."""
import copy

import pytest
import torch

from conftest import TINY_LADDER, TINY_MEASURE
from lcredit.errors import ConfigError
from lcredit.models import ResMLP
from lcredit.models.base import compile_mode, compile_parts
from lcredit.rules import BP, DFA
from lcredit.train import train

pytestmark = pytest.mark.xdist_group("compile")  # one worker pays inductor's start-up


def steps(rule, xs, ys):
    opt = rule.make_optimizer()
    for x, y in zip(xs, ys):
        rule.update(x, y, opt)
    return dict(rule.named_parameters())


@pytest.mark.parametrize("cls", [BP, DFA], ids=["bp", "dfa"])
def test_the_compiled_step_is_the_eager_step(cls):
    torch.manual_seed(0)
    eager = cls(ResMLP((20,), 10, d=16, depth=3, mlp_ratio=2.0), (20,), 10)
    compiled = copy.deepcopy(eager)
    compiled.compile_model("default")
    assert all(b._compiled_call_impl is not None for b in compiled.model.blocks)
    xs, ys = torch.randn(6, 32, 20), torch.randint(0, 10, (6, 32))
    start = {k: v.detach().clone() for k, v in eager.named_parameters()}
    want, got = steps(eager, xs, ys), steps(compiled, xs, ys)
    for k in want:
        assert not torch.equal(want[k], start[k]), k  # every parameter moved
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    # the control: a compiled step on other batches is told apart
    other = steps(copy.deepcopy(compiled), xs.flip(0), ys.flip(0))
    assert any(not torch.allclose(other[k], want[k], rtol=1e-5, atol=1e-6) for k in want)


def test_a_deep_copy_of_a_compiled_model_runs_its_own_parameters():
    """The protocol measures on deep copies: they must not call the original's compiled code."""
    model = ResMLP((20,), 10, d=16, depth=2)
    compile_parts(model, "default")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.readout.parameters():
            p.zero_()
    x = torch.randn(4, 20)
    assert torch.count_nonzero(twin(x)) == 0 and torch.count_nonzero(model(x)) > 0


def test_compile_modes_and_a_bad_value():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_mode(False, cpu) is None and compile_mode(None, cuda) is None
    assert compile_mode(True, cpu) == "default"
    assert compile_mode(True, cuda) == "reduce-overhead"
    assert compile_mode("max-autotune", cpu) == "max-autotune"
    with pytest.raises(ConfigError, match="trainer.compile='fast'"):
        compile_mode("fast", cpu)
    # CUDA graphs cannot follow the buffer swaps of a model with buffers (BatchNorm)
    bn = torch.nn.Sequential(torch.nn.BatchNorm1d(4))
    assert compile_mode(True, cuda, bn) == "default"
    assert compile_mode(True, cuda, ResMLP((20,), 10, d=16, depth=1)) == "reduce-overhead"
    with pytest.raises(ConfigError, match="trainer.compile='reduce-overhead'.*buffers"):
        compile_mode("reduce-overhead", cuda, bn)


def test_compiled_parts_keep_compiling_past_torchs_default_recompile_limit():
    """Every compiled part shares one code object; torch's default of 8 variants would leave
    the rest of a run (new batch sizes, eval mode, other blocks) silently eager."""
    import torch._dynamo.config as dynamo

    compile_parts(ResMLP((20,), 10, d=16, depth=1), "default")
    assert dynamo.recompile_limit >= 64


def test_a_run_with_trainer_compile_matches_the_eager_run(make_cfg):
    common = ["method=dfa", *TINY_LADDER, *TINY_MEASURE, "trainer.max_epochs=1",
              "protocol.abort.enabled=false"]
    eager = train(make_cfg(*common, out="eager"))
    compiled = train(make_cfg(*common, "trainer.compile=true", out="compiled"))
    assert compiled["config"]["trainer"]["compile"] is True
    assert compiled["compile_mode"] == "default" and eager["compile_mode"] is None
    assert compiled["status"] == eager["status"] == "completed"
    a, b = (torch.load(r["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
            for r in (eager, compiled))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert compiled["final"]["test_acc"] == pytest.approx(eager["final"]["test_acc"], abs=0.01)
