"""Random override combinations, valid and invalid, for every option of every group: each run
either builds and takes a training step, or stops with one ConfigError line (the CLI's
`lcredit: error:` and exit 2) — never a traceback from inside torch, Lightning or Hydra."""
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from conftest import compose_cfg
from lcredit.errors import ConfigError
from lcredit.train import train

CONF = Path(__file__).resolve().parents[1] / "conf"
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
MODELS = ["resmlp", "student", "linear_resmlp"]
# each task at a small size (the fuzzed overrides come after and may change it)
DATA = {"ladder_lowdim": ["data.n_train=256", "data.n_test=128"],
        "ladder": ["data.n_train=256", "data.n_test=128"], "digits": [], "lq": []}


def options(group: str, name: str) -> list[str]:
    node = OmegaConf.load(CONF / group / f"{name}.yaml")
    keys = [k for k in node if not str(k).startswith("_") and k != "defaults"]
    for parent in node.get("defaults", []) or []:  # a preset: its base's options too
        if isinstance(parent, str) and parent != "_self_":
            keys += options(group, parent)
    return sorted(set(keys))


GLOBAL = ["seed", "block_grad_clip", "optim.lr", "optim.weight_decay", "trainer.max_epochs",
          "protocol.every_n_epochs", "protocol.eval_batches", "protocol.stability_batches",
          "protocol.batch_size", "protocol.thresholds.a", "protocol.thresholds.b",
          "protocol.thresholds.c", "protocol.thresholds.d", "protocol.measure.rho_samples",
          "protocol.measure.rho_directions", "protocol.measure.null_draws",
          "protocol.abort.min_epochs", "protocol.abort.patience", "data.batch_size",
          "data.random_targets"]
# values of every kind: sensible, boundary, wrong type, wrong sign, out of range
VALUES = st.one_of(st.integers(-2, 4), st.sampled_from([0.0, 0.5, 1e-3, -0.5, 1.5, 64, 1e9]),
                   st.sampled_from(["abc", "true", "false", "null", "[1,2]", "[]", "''", "-1e-9",
                                    "gated", "relative", "skip", "input", "batch", "eT_hL",
                                    "sweep", "gd", "displacement", "layerwise", "zero_target",
                                    "constant_input", "relu", "identity"]),
                   st.sampled_from(["nan", "inf", "-inf"]),  # pass every range check
                   st.booleans())


def typo(key: str, i: int) -> str:
    """``key`` with its last part misspelt (a letter dropped, or a letter doubled)."""
    head, _, last = key.rpartition(".")
    j = i % len(last)
    bad = last[:j] + last[j + 1:] if i % 2 and len(last) > 1 else last[:j] + last[j] + last[j:]
    return f"{head}.{bad}" if head else bad


@st.composite
def runs(draw):
    method = draw(st.sampled_from(METHODS))
    data = draw(st.sampled_from(sorted(DATA)))
    # mostly a model that fits the task (so that most draws reach the rule's own checks)
    fits = "linear_resmlp" if data == "lq" else draw(st.sampled_from(["resmlp", "student"]))
    model = draw(st.sampled_from(MODELS)) if draw(st.integers(0, 4)) == 0 else fits
    keys = ([f"method.{k}" for k in options("method", method)]
            + [f"model.{k}" for k in options("model", model)]
            + [f"data.{k}" for k in options("data", data) if k not in ("n_train", "n_test")]
            + GLOBAL)
    chosen = draw(st.lists(st.sampled_from(keys), min_size=1, max_size=2, unique=True))
    extra = []
    if draw(st.integers(0, 3)) == 0:  # a key nothing reads, added with +: never silently run
        bad = typo(draw(st.sampled_from(keys)), draw(st.integers(0, 40)))
        if bad not in keys and bad.split(".")[-1]:
            extra = [f"+{bad}={draw(VALUES)}"]
    return [f"method={method}", f"model={model}", f"data={data}", *DATA[data]] + [
        f"{k}={draw(VALUES)}" for k in chosen] + extra


@pytest.mark.slow
@settings(max_examples=50, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(overrides=runs())
def test_any_override_combination_runs_a_step_or_fails_in_one_line(tmp_path_factory, overrides):
    out = tmp_path_factory.mktemp("fuzz")
    cfg = compose_cfg(out / "run", "trainer.max_epochs=1", "++trainer.limit_train_batches=1",
                      "++trainer.limit_val_batches=1",
                      "protocol.measure.rho_samples=32", "protocol.measure.rho_directions=4",
                      "protocol.measure.null_draws=2", *overrides)
    try:
        results = train(cfg)
    except ConfigError as err:
        msg = str(err)
        assert msg and "\n" not in msg, (overrides, msg)
        event("one-line error")
        return
    assert not any(o.startswith("+") for o in overrides), ("an unknown key ran", overrides)
    assert not any(o.split("=", 1)[1] in ("nan", "inf", "-inf") for o in overrides), (
        "a non-finite number ran", overrides)
    event("trained")
    assert results["status"] in ("completed", "aborted", "diverged"), (overrides, results["status"])
    assert results["final"]["epochs"] >= 1, overrides


# ---- the tools' arguments: probe, exploit and audit on one small checkpoint
TOOL_VALUES = st.one_of(st.integers(-2, 3), st.sampled_from([0.0, 0.5, 1e-3, -0.5, 1.5]),
                        st.sampled_from(["abc", "true", "null", "[1,2]", "[]", "nan", "inf",
                                         "-inf", "own", "bp", "dfa", "sb", "last", "all",
                                         "[0.1,nan]", "adam"]),
                        st.booleans())
TOOL_KEYS = {"probe": ["rules", "steps", "batch_size", "estimator_optim"],
             "exploit": ["sources", "k", "blocks", "step_sizes", "batch_size", "fit_steps",
                         "seed"],
             "audit": ["thresholds.a", "thresholds.b", "thresholds.c", "thresholds.d",
                       "frozen_baseline"]}


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("tool_fuzz")
    r = train(compose_cfg(out / "run", "method=dfa", "data.n_train=256", "data.n_test=128",
                          "model.d=16", "model.depth=2", "trainer.max_epochs=1",
                          "protocol.measure.rho_samples=32", "protocol.measure.rho_directions=4",
                          "protocol.measure.null_draws=2"))
    return r["checkpoint"]


@st.composite
def tool_runs(draw):
    tool = draw(st.sampled_from(sorted(TOOL_KEYS)))
    keys = draw(st.lists(st.sampled_from(TOOL_KEYS[tool]), min_size=1, max_size=2, unique=True))
    args = [f"{k}={draw(TOOL_VALUES)}" for k in keys]
    if draw(st.integers(0, 3)) == 0:  # a key the tool does not have
        args.append(f"+{typo(draw(st.sampled_from(TOOL_KEYS[tool])), draw(st.integers(0, 9)))}=1")
    return tool, args


@pytest.mark.slow
@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(drawn=tool_runs())
def test_any_tool_argument_combination_runs_or_fails_in_one_line(small_checkpoint,
                                                                 tmp_path_factory, capsys,
                                                                 drawn):
    """Each tool either writes its result or says one `lcredit.<tool>: error:` line and exits
    2; never a traceback, never a result from a nan, an inf or a key it does not have."""
    import importlib

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lcredit.train import CONF_DIR

    tool, args = drawn
    out = tmp_path_factory.mktemp("tool")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(tool, overrides=[f"ckpt={small_checkpoint}", f"out={out}", *args])
    module = importlib.import_module(f"lcredit.{tool}")
    capsys.readouterr()
    try:
        module.main.__wrapped__(cfg)
    except SystemExit as exit_:
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if "error" in ln]
        assert exit_.code == 2 and len(lines) == 1, (args, err[-1500:])
        assert lines[0].startswith(f"lcredit.{tool}: error:"), (args, lines)
        event("one-line error")
        return
    assert not any(a.startswith("+") for a in args), ("an unknown key ran", args)
    assert not any(bad in a for a in args for bad in ("nan", "inf")), ("non-finite ran", args)
    assert list(out.glob(f"{tool}*.json")), (args, "no result written")
    event("ran")
