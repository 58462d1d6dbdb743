"""The frozen-blocks comparator of diagnostic (d): a number, a frozen run's results.json, or
``auto`` (train that run with the same task, model, seed and epochs, and cache it)."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf, open_dict

from lcredit.data import DeviceBatches
from lcredit.diagnostics.hooked import find_blocks
from lcredit.diagnostics.measure import copy_without_trainer
from lcredit.errors import ConfigError

log = logging.getLogger("lcredit")
FROZEN_TARGET = "lcredit.rules.Frozen"
# What makes two frozen-blocks runs the same run.
KEY_FIELDS = ("data", "model", "optim", "seed")
KEY_TRAINER = ("max_epochs", "limit_train_batches", "precision")


def is_frozen(cfg: DictConfig) -> bool:
    return cfg.method.get("_target_") in (FROZEN_TARGET, "lcredit.rules.frozen.Frozen")


def from_results(path: Path) -> dict:
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"protocol.frozen_baseline={path}: cannot read it as results.json "
                          f"({err})") from None
    if results.get("status") in ("diverged", "failed", "interrupted"):
        raise ConfigError(f"protocol.frozen_baseline={path}: that frozen run "
                          f"{results.get('status')}; it is no comparator")
    acc = (results.get("final") or {}).get("test_acc")
    if acc is None:
        raise ConfigError(f"protocol.frozen_baseline={path}: no final test_acc in it "
                          f"(status {results.get('status')!r})")
    if results.get("rule") not in (None, "frozen"):
        raise ConfigError(f"protocol.frozen_baseline={path} is a {results.get('rule')!r} run, "
                          f"not a frozen-blocks run")
    return {"source": str(path), "final_acc": float(acc),
            "history_acc": [r.get("test_acc") for r in results.get("history", [])]}


# Where a frozen run given as a file may differ from the run it is compared with: where the
# data lives, not what it is.
MAY_DIFFER = {"data.root", "data.download"}


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def mismatches(frozen_config: dict, cfg: DictConfig) -> list[str]:
    """The cache key's fields (task, model, optimiser, seed, the trainer's length and
    precision) on which a frozen run's recorded config and this run's differ."""
    ours = OmegaConf.to_container(cfg, resolve=True)

    def key_part(c: dict) -> dict:
        node = {k: c.get(k) for k in KEY_FIELDS}
        node["trainer"] = {k: (c.get("trainer") or {}).get(k) for k in KEY_TRAINER}
        return _flat(node)

    a, b = key_part(frozen_config), key_part(ours)
    return sorted(k for k in set(a) | set(b) if k not in MAY_DIFFER and a.get(k) != b.get(k))


def cache_key(cfg: DictConfig) -> str:
    node = {k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig)
            else cfg[k] for k in KEY_FIELDS if k in cfg}
    node["trainer"] = {k: cfg.trainer.get(k) for k in KEY_TRAINER}
    # A branched run's frozen baseline starts from the same checkpoint (its blocks are the
    # "initialisation"): that checkpoint, as it is now, is part of what the run is.
    branch = cfg.get("init_from")
    if branch is not None:
        path = Path(str(branch)).resolve()
        stat = path.stat() if path.is_file() else None
        node["init_from"] = [str(path), stat and stat.st_size, stat and stat.st_mtime_ns]
    return hashlib.sha1(json.dumps(node, sort_keys=True, default=str).encode()).hexdigest()[:16]


def frozen_config(cfg: DictConfig, out_dir: Path) -> DictConfig:
    frozen = OmegaConf.load(Path(__file__).resolve().parent / "conf" / "method" / "frozen.yaml")
    # Unresolved, so ${paths.output_dir} in the callbacks points at the cache dir set below
    # (resolved early, the frozen run's checkpoint would land in the calling run's directory).
    new = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(new):
        new.method = frozen
        new.resume = None
        new.snapshot_epochs = []
        new.paths.output_dir = str(out_dir)
        new.protocol.frozen_baseline = None
        new.logger = {}
        new.callbacks = {k: v for k, v in new.callbacks.items()
                         if k in ("model_checkpoint", "progress_bar")}
    return new


def resolve(cfg: DictConfig, train_fn) -> dict | None:
    """Turn ``protocol.frozen_baseline`` into {"source", "final_acc", "history_acc"}."""
    spec = cfg.get("protocol", {}).get("frozen_baseline")
    if spec is None:
        return None
    if isinstance(spec, bool):
        raise ConfigError("protocol.frozen_baseline must be a number, a path, auto or null")
    if isinstance(spec, (int, float)):
        if not 0.0 <= float(spec) <= 1.0:
            raise ConfigError(f"protocol.frozen_baseline={spec}: give an accuracy in [0, 1] "
                              f"(e.g. 0.42), not a percentage")
        return {"source": "number", "final_acc": float(spec), "history_acc": None}
    spec = str(spec)
    if spec != "auto":
        return _from_file(cfg, spec)
    if is_frozen(cfg):
        return {"source": "self", "final_acc": None, "history_acc": None}
    return _auto(cfg, train_fn)


def _from_file(cfg: DictConfig, spec: str) -> dict:
    """A frozen run's results.json, checked to be this run's comparator (its task, model, seed
    and epochs) unless ``protocol.frozen_baseline_check=false``."""
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"protocol.frozen_baseline={spec}: no such file (give a frozen "
                          f"run's results.json, a number, auto or null)")
    found = from_results(path)
    recorded = json.loads(path.read_text()).get("config")
    if not cfg.get("protocol", {}).get("frozen_baseline_check", True):
        return found | {"check": "off", "mismatched": (mismatches(recorded, cfg)
                                                        if recorded else None)}
    if not recorded:
        raise ConfigError(f"protocol.frozen_baseline={path}: it records no config to check "
                          f"against this run (protocol.frozen_baseline_check=false accepts "
                          f"it unchecked)")
    diffs = mismatches(recorded, cfg)
    if diffs:
        shown = "; ".join(f"{k}: {_flat(recorded).get(k)!r} there, "
                          f"{_flat(OmegaConf.to_container(cfg, resolve=True)).get(k)!r} here"
                          for k in diffs[:4])
        more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
        raise ConfigError(f"protocol.frozen_baseline={path} is not this run's comparator "
                          f"({shown}{more}); give the frozen run of this task, model, seed "
                          f"and epochs, or protocol.frozen_baseline_check=false")
    return found | {"check": "matched"}


def _auto(cfg: DictConfig, train_fn) -> dict:
    """``auto``: the frozen-blocks run of this run's settings, from the cache or trained there
    now (once for a sweep's jobs that need it at the same time)."""
    key = cache_key(cfg)
    out_dir = Path(cfg.paths.cache_dir) / "frozen" / key
    cached = out_dir / "results.json"
    # Runs that need the same baseline at the same time (a sweep's jobs) train it once: the
    # first holds the lock while it trains, the others wait and reuse its result.
    locks = Path(cfg.paths.cache_dir) / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"frozen-{key}.lock")):
        if cached.is_file():
            try:
                found = from_results(cached)
                if json.loads(cached.read_text()).get("status") == "completed":
                    log.info("frozen baseline: reusing %s", cached)
                    return found | {"cached": True}
            except (ConfigError, json.JSONDecodeError):
                pass  # an unreadable or unusable cache entry is retrained below
        log.info("frozen baseline: training the frozen-blocks run into %s", out_dir)
        results = train_fn(frozen_config(cfg, out_dir))
        if results.get("status") != "completed":
            # never a comparator, never cached: the next run trains it afresh
            shutil.rmtree(out_dir, ignore_errors=True)
            log.warning("frozen baseline %s: (d) is not evaluated", results.get("status"))
            return {"source": "auto", "final_acc": None, "history_acc": None,
                    "status": results.get("status"), "divergence": results.get("divergence")}
        return from_results(cached) | {"cached": False}


def accuracy_at(frozen_baseline: dict | None, epoch: int, headline_acc=None):
    """The comparator for a measurement at ``epoch``: the frozen run's accuracy at the same
    epoch when its history is known (fair mid-run), else its final. A frozen-blocks run has
    none: compared with itself, (d) would be 0 and fire on every frozen run."""
    if not frozen_baseline or frozen_baseline.get("source") == "self":
        return None
    hist = frozen_baseline.get("history_acc") or []
    return hist[epoch - 1] if 0 < epoch <= len(hist) else frozen_baseline.get("final_acc")


def linear_probe(task, epochs: int, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                 device=None) -> float:
    """Test accuracy of a linear classifier on the raw (flattened) input, trained with Adam on
    the task's own training stream (fresh samples where the task draws them) for ``epochs``:
    what a task gives without any hidden layer. A task on which this comes close to backprop
    cannot show what depth, or a rule's deep credit, adds."""
    device = device or task.x_train.device
    gen = torch.Generator().manual_seed(int(seed))
    dim = task.x_train[0].numel()
    probe = torch.nn.Linear(dim, task.num_classes).to(device)
    with torch.no_grad():  # a seeded init, independent of the global random state
        bound = dim ** -0.5
        probe.weight.copy_((torch.rand(probe.weight.shape, generator=gen) * 2 - 1) * bound)
        probe.bias.zero_()
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    batches = DeviceBatches(task.x_train.to(device), task.y_train.to(device), batch_size,
                            shuffle=True, seed=seed, resample=task.resample)
    for epoch in range(int(epochs)):
        batches.sampler.set_epoch(epoch)
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(probe(x.flatten(1)), y).backward()
            opt.step()
    with torch.no_grad():
        pred = probe(task.x_test.to(device).flatten(1)).argmax(1)
    return float((pred == task.y_test.to(device)).float().mean())


def frozen_baseline(module, dataloaders, blocks, epochs: int = 1, lr: float = 1e-3,
                    batch=None, loss_fn=None, forward=None) -> float:
    """(d)'s comparator for a module of the user's (``lcredit.Protocol(frozen_baseline=...)``):
    a copy of ``module`` with the ``blocks`` (names, patterns or a callable, as for the
    Protocol) frozen at their current weights and everything else trained by backprop (Adam,
    ``lr``) for ``epochs`` on ``dataloaders[0]``; returns its accuracy on ``dataloaders[1]``
    (a fraction). Call it before training, on the freshly initialised module."""
    train_loader, test_loader = dataloaders
    net = copy_without_trainer(module)
    _, frozen = find_blocks(net, blocks)
    frozen_ids = {id(p) for b in frozen for p in b.parameters()}
    params = [p for p in net.parameters() if id(p) not in frozen_ids]
    for b in frozen:
        b.requires_grad_(False)
    opt = torch.optim.Adam(params, lr=lr)
    device = next(net.parameters()).device
    split = batch or (lambda b: (b[0], b[1]))
    run = forward or (lambda m, x: m(x))
    loss = loss_fn or (lambda out, y: F.cross_entropy(out, y))
    net.train()
    for _ in range(int(epochs)):
        for b in train_loader:
            x, y = (t.to(device) for t in split(b))
            opt.zero_grad(set_to_none=True)
            loss(run(net, x), y).mean().backward()
            opt.step()
    net.eval()
    right = total = 0
    with torch.no_grad():
        for b in test_loader:
            x, y = (t.to(device) for t in split(b))
            right += int((run(net, x).argmax(1) == y).sum())
            total += len(y)
    return right / max(total, 1)
