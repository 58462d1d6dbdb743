"""One source for every default: a config group's yaml gives each option the value its
constructor (or task function) defaults to, so ``method=cb`` and ``CB(...)`` are the same rule.
A preset — a yaml named for something other than its target (``cb_relative``, ``linear_resmlp``,
``cifar10``) — is a named variant and may differ; the base yaml may not."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_object
from omegaconf import OmegaConf

from conftest import CONF
from lcredit.diagnostics.measure import DEFAULTS as MEASURE_DEFAULTS
from lcredit.diagnostics.protocol import check_thresholds
from lcredit.options import option_defaults

GROUPS = ("method", "model", "data")


def _is_base(yaml: Path, target) -> bool:
    name = getattr(target, "__name__", "").lower().replace("_", "")
    return yaml.stem.replace("_", "") == name


def _base_yamls():
    for group in GROUPS:
        for path in sorted((Path(CONF) / group).glob("*.yaml")):
            node = OmegaConf.to_container(OmegaConf.load(path))
            if "_target_" not in node or "defaults" in node:
                continue
            target = get_object(node["_target_"])
            if _is_base(path, target):
                yield pytest.param(path, target, node, id=f"{group}/{path.stem}")


BASES = list(_base_yamls())


def test_every_rule_and_model_has_a_base_yaml():
    names = {p.id for p in BASES}
    for rule in ("bp", "frozen", "fa", "dfa", "ep", "sb", "cb", "vec", "blend"):
        assert f"method/{rule}" in names
    for model in ("resmlp", "small_cnn", "vit_mini", "student"):
        assert f"model/{model}" in names


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def _differ(target, node: dict) -> dict:
    defaults = option_defaults(target)
    return {k: (v, defaults[k]) for k, v in node.items()
            if k in defaults and _plain(v) != _plain(defaults[k])}


@pytest.mark.parametrize("path,target,node", BASES)
def test_a_base_yaml_gives_its_constructors_defaults(path, target, node):
    assert not _differ(target, node), f"{path.name}: yaml value vs constructor default"


def test_the_protocol_callbacks_yaml_defaults_are_the_callbacks():
    """conf/callbacks/default.yaml (through conf/protocol/default.yaml) builds the Protocol and
    EarlyAbort with their Python defaults (the thresholds and measurement sizes a ``None``
    stands for included), but for what lcredit's runs set on purpose: the blocks measured
    directly, the abort decided by EarlyAbort, the protocol's own batch size."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config")  # the defaults as they are, no test's overrides
    on_purpose = {"protocol_monitor": {"blocks", "abort", "batch_size"}, "early_abort": set()}
    for name, keys in on_purpose.items():
        node = OmegaConf.to_container(cfg.callbacks[name], resolve=True)
        target = get_object(node.pop("_target_"))
        if name == "protocol_monitor":
            assert node.pop("thresholds") == check_thresholds(None)
            assert node.pop("measure") | {"seed": node["seed"]} == MEASURE_DEFAULTS
        differ = {k: v for k, v in _differ(target, node).items() if k not in keys}
        assert not differ, (name, differ)


def test_the_check_sees_the_estimators_option_objects():
    """An estimator's defaults are its options dataclass's: a yaml with cb's aux_lr at 3e-3
    against CBOptions' 1e-3 (the disagreement this test exists for) is caught."""
    from lcredit.rules import CB, VEC

    assert option_defaults(CB)["aux_lr"] == 1e-3 and option_defaults(CB)["warmup_ratio"] == 0.2
    assert _differ(CB, {"aux_lr": 3e-3, "K": 4}) == {"aux_lr": (3e-3, 1e-3)}
    assert option_defaults(VEC)["penalty_lam"] == 0.0  # the rule's own parameters too
