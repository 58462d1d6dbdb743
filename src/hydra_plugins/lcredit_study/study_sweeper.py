"""``hydra/sweeper=study``: ``python -m lcredit.train experiment=<study> -m`` runs the study's
jobs (arms × axes × seeds of its ``study:`` node, at ``scale``) through the configured launcher.

The expansion is lcredit.study's, so this sweep and ``python -m lcredit.study <study>`` lay
out the same jobs in the same directories. Command-line values still apply to every job; a
swept value (``model.depth=2,4``) is crossed with the study's jobs; ``seed=...`` replaces the
study's seeds.
"""

import itertools
import sys
from dataclasses import dataclass
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig


@dataclass
class StudySweeperConf:
    _target_: str = "hydra_plugins.lcredit_study.study_sweeper.StudySweeper"
    max_batch_size: Optional[int] = None
    # hydra.sweeper.arms=[bp,dfa]: only these arms of the study (a quick look); null: all
    arms: Optional[List[str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="study", node=StudySweeperConf,
                             provider="lcredit")


class StudySweeper(Sweeper):
    def __init__(self, max_batch_size: Optional[int] = None,
                 arms: Optional[List[str]] = None) -> None:
        self.max_batch_size = max_batch_size
        self.arms = list(arms) if arms else None
        self.config: Optional[DictConfig] = None
        self.launcher = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        from lcredit.errors import ConfigError
        from lcredit.jobs import MAIN, expand, stages, study_node, sweep_overrides

        assert self.config is not None and self.launcher is not None
        try:
            study = study_node(self.config)
            scale = str(self.config.get("scale", "paper"))
            plan = stages(study, scale)
            if list(plan) != [MAIN]:
                raise ConfigError(
                    f"study {study['name']} has stages ({', '.join(plan)}), which run in order: "
                    f"python -m lcredit.study {study['name']} scale={scale}")
            fixed, swept, seeds = [], [], None
            for o in OverridesParser.create().parse_overrides(arguments):
                key = o.get_key_element()
                if key == "seed":
                    seeds = ([int(v) for v in o.sweep_string_iterator()] if o.is_sweep_override()
                             else [int(o.value())])
                elif o.is_sweep_override():
                    swept.append([(key, v) for v in o.sweep_string_iterator()])
                else:
                    fixed.append(o.input_line)
            jobs = expand(study, scale, seeds=seeds)
            if self.arms:
                unknown = sorted(set(self.arms) - {j.arm for j in jobs})
                if unknown:
                    raise ConfigError(f"hydra.sweeper.arms: {unknown[0]!r} is not an arm of study "
                                      f"{study['name']} ({', '.join(dict.fromkeys(j.arm for j in jobs))})")
                jobs = [j for j in jobs if j.arm in self.arms]
        except ConfigError as err:
            print(f"lcredit: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        batch = []
        for job in jobs:
            for combo in itertools.product(*swept) if swept else [()]:
                for key, value in combo:  # a swept value is an axis of its own
                    job.labels[key.split(".")[-1]] = value
                # the command line's own values last: they win over the study's
                batch.append([*sweep_overrides(job), *(f"{k}={v}" for k, v in combo), *fixed])
                for key, _ in combo:
                    job.labels.pop(key.split(".")[-1])
        returns = []
        n = self.max_batch_size or len(batch)
        for i in range(0, len(batch), n):
            returns.append(self.launcher.launch(batch[i:i + n], initial_job_idx=i))
        return returns
