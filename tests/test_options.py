"""One declaration of every option's type and range, one path that checks it (docs/options.md).

A number given to lcredit is refused the same way wherever it is given — the command line, a
config group, a tool's argument, a constructor called from Python — because every option is
declared once (an annotation on what reads it, or a TypedDict for a config node) and
``lcredit.options.check_options`` is the only thing that reads those declarations.
"""
import math
import typing
from pathlib import Path

import pytest
from hydra.utils import get_class, get_method
from omegaconf import OmegaConf

from lcredit.data import Batching, build_task
from lcredit.diagnostics.protocol import ProtocolOptions
from lcredit.errors import ConfigError
from lcredit.options import Range, _declared, check_options

CONF = Path(__file__).resolve().parents[1] / "src" / "lcredit" / "conf"
GROUPS = ("method", "model", "data")


def _target(node):
    target = node["_target_"]
    try:
        cls = get_class(target)
        return cls.__init__
    except Exception:  # noqa: BLE001 — a function (a data task), not a class
        return get_method(target)


def _options(group):
    """(yaml name, target, {option: default}) of every config of a group."""
    out = []
    for path in sorted((CONF / group).glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if "_target_" not in node:
            continue
        opts = {k: v for k, v in node.items() if not k.startswith("_")}
        if group == "data":
            opts = {k: v for k, v in opts.items() if k not in Batching.__annotations__}
        out.append((f"{group}/{path.stem}", _target(node), opts))
    return out


CONFIGS = [c for g in GROUPS for c in _options(g)]


def _ranges(hint):
    """The Range declarations inside ``hint`` (through unions and Annotated)."""
    if typing.get_origin(hint) is typing.Annotated:
        args = typing.get_args(hint)
        return [m for m in args[1:] if isinstance(m, Range)] + _ranges(args[0])
    if typing.get_origin(hint) in (typing.Union, __import__("types").UnionType):
        return [r for a in typing.get_args(hint) for r in _ranges(a)]
    return []


@pytest.mark.parametrize("name,target,opts", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_every_numeric_option_of_a_config_is_declared_and_its_default_passes(name, target, opts):
    """Each number a yaml sets has a declared type (so nan, a string or a fraction of a
    whole number is refused), and the yaml's own values pass their declarations."""
    hints = _declared(target)[0]
    for key, value in opts.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert key in hints, f"{name}: {key} has no declared type"
        if isinstance(value, str) and value.startswith("${"):
            continue  # an interpolation: checked once resolved, in the run's config
        check_options(target, {key: value}, name.split("/")[0])


@pytest.mark.parametrize("name,target,opts", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_a_value_outside_a_declared_range_or_nan_is_refused_naming_the_key(name, target, opts):
    group = name.split("/")[0]
    hints = _declared(target)[0]
    checked = 0
    for key in opts:
        for r in _ranges(hints.get(key)):
            bad = (r.lo - 1 if not r.lo_open else r.lo) if r.lo is not None else r.hi + 1
            with pytest.raises(ConfigError, match=rf"^{group}\.{key}="):
                check_options(target, {key: bad}, group)
            with pytest.raises(ConfigError, match=rf"^{group}\.{key}=nan must be a finite"):
                check_options(target, {key: math.nan}, group)
            checked += 1
    if not any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in opts.values()):
        return
    assert checked, f"{name}: numeric options, but none with a declared range"


def test_a_constructor_called_from_python_refuses_what_the_config_refuses():
    """The Python API and the command line share the declaration and the message."""
    from lcredit.models.resmlp import ResMLP
    from lcredit.rules.cb import CB

    model = ResMLP((8,), 3, d=8, depth=2)
    with pytest.raises(ConfigError) as direct:
        CB(model, (8,), 3, aux_lr=float("nan"))
    with pytest.raises(ConfigError) as via_config:
        check_options(CB.__init__, {"aux_lr": float("nan")}, "method")
    assert str(direct.value) == str(via_config.value) == "method.aux_lr=nan must be a finite number"
    with pytest.raises(ConfigError, match=r"method\.sigma_scal: .*did you mean method\.sigma_scale"):
        CB(model, (8,), 3, sigma_scal="relative")
    with pytest.raises(ConfigError, match=r"^model\.depth=0 must be >= 1"):
        ResMLP((8,), 3, depth=0)
    # an option a subclass re-lists bare keeps its parent's declaration
    with pytest.raises(ConfigError, match=r"^method\.width=2\.5 must be a whole number"):
        CB(model, (8,), 3, width=2.5)


def test_a_task_function_refuses_like_the_data_config():
    with pytest.raises(ConfigError, match=r"^data\.alpha=nan must be a finite number"):
        build_task(OmegaConf.create({"_target_": "lcredit.data.synthetic.ladder",
                                     "alpha": float("nan")}))
    from lcredit.data.synthetic import ladder
    with pytest.raises(ConfigError, match=r"^data\.alpha=2 must be in \[0, 1\]"):
        ladder(alpha=2)


def test_the_protocol_yaml_and_its_declaration_name_the_same_options():
    """conf/protocol/default.yaml gives every declared option a default, and declares nothing
    the yaml lacks; its defaults pass the declaration."""
    node = OmegaConf.to_container(OmegaConf.load(CONF / "protocol" / "default.yaml"))

    def keys(td):
        hints = typing.get_type_hints(td)
        return {k: keys(h) if typing.is_typeddict(h) else None for k, h in hints.items()}

    def tree(d):
        return {k: tree(v) if isinstance(v, dict) else None for k, v in d.items()}

    assert tree(node) == keys(ProtocolOptions)
    check_options(ProtocolOptions, node, "protocol")


def test_audit_holds_its_thresholds_to_the_runs_declaration(tmp_path):
    """An audit's thresholds are refused where train's would be (one declaration)."""
    from lcredit.audit import audit

    with pytest.raises(ConfigError) as audited:
        audit(tmp_path / "none.ckpt", thresholds={"a": -5})
    with pytest.raises(ConfigError) as trained:
        check_options(ProtocolOptions, {"thresholds": {"a": -5}}, "protocol")
    assert str(audited.value) == "thresholds.a=-5 must be > 0"
    assert str(trained.value) == "protocol.thresholds.a=-5 must be > 0"
    with pytest.raises(ConfigError, match=r"thresholds\.e: .*"):
        audit(tmp_path / "none.ckpt", thresholds={"e": 1.0})


@pytest.mark.parametrize("tool,kwargs,message", [
    ("lcredit.probe:probe", {"steps": float("nan")}, r"^steps=nan must be a finite number"),
    ("lcredit.probe:probe", {"batch_size": 0}, r"^batch_size=0 must be >= 1"),
    ("lcredit.exploit:exploit", {"step_sizes": [0.1, float("inf")]},
     r"^step_sizes\[1\]=inf must be a finite number"),
    ("lcredit.exploit:exploit", {"seed": -1}, r"^seed=-1 must be in \[0, 4294967295\]"),
    ("lcredit.exploit:exploit", {"blocks": "first"}, r"^blocks='first' is not one of all, last"),
    ("lcredit.analysis.calibrate:calibrate", {"null_draws": 0}, r"^null_draws=0 must be >= 1"),
])
def test_a_tool_refuses_a_bad_argument_before_reading_anything(tool, kwargs, message, tmp_path):
    module, name = tool.split(":")
    fn = getattr(__import__(module, fromlist=[name]), name)
    with pytest.raises(ConfigError, match=message):
        fn(tmp_path / "none.ckpt", **kwargs)


@pytest.mark.parametrize("override,message", [
    ({"seed": 2**40}, r"^seed=1099511627776 must be in \[0, 4294967295\]"),
    ({"trainer": {"max_epochs": 2.5}}, r"^trainer\.max_epochs=2\.5 must be"),
    ({"trainer": {"limit_train_batches": 0.0}}, r"^trainer\.limit_train_batches=0\.0 must be"),
    ({"optim": {"lr": -1.0}}, r"^optim\.lr=-1\.0 must be > 0"),
    ({"skip_completed": "maybe"}, r"^skip_completed='maybe' must be true or false or one of auto"),
    ({"snapshot_epochs": [1, -2]}, r"^snapshot_epochs\[1\]=-2 must be >= 0"),
])
def test_the_runs_own_options_are_declared_too(override, message):
    from hydra import compose, initialize_config_dir

    from lcredit import config

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["paths.output_dir=.", "hydra/job_logging=none"])
    cfg = OmegaConf.merge(cfg, override)
    with pytest.raises(ConfigError, match=message):
        config.validate(cfg)


@pytest.mark.parametrize("module,args,needle", [
    ("lcredit.train", ["method=cb", "method.sigma_scal=relative"],
     "method.sigma_scal: no such option; did you mean method.sigma_scale?"),
    ("lcredit.train", ["trainer.max_epoch=3"], "did you mean trainer.max_epochs?"),
    ("lcredit.train", ["method=cbb"], "Available options in 'method': blend, "),
    ("lcredit.train", ["method.x=["], "method.x=[: "),
    ("lcredit.probe", ["ckpt=x", "stepz=3"], "stepz: no such option; did you mean steps?"),
    ("lcredit.audit", ["ckpt=x", "thresholds.e=3"], "thresholds.e: no such option"),
])
def test_a_mistake_hydra_finds_is_one_line_and_exit_2_too(module, args, needle, tmp_path):
    """A key that does not exist, a group option that does not exist, bad override syntax:
    Hydra finds these before lcredit runs; they still end in one line and exit code 2."""
    from conftest import forked_cli

    proc = forked_cli(module, *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, lines
