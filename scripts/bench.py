"""Milliseconds per training step of every rule: lcredit (Lightning + Hydra config + the shared
block-local update) next to its plain reference loop (scripts/reference.py: the same math in
plain PyTorch), in one process on one device; peak memory of a step; the protocol's share of
the default run.

    python scripts/bench.py                      # CPU; writes docs/bench.json and docs/bench.md
    python scripts/bench.py --device cuda --out docs/bench_cuda

Tasks: ``default`` (the default run's data and model: the low-dimensional ladder, resmlp
d=128 depth 4) and ``cifar`` (CIFAR-shaped Gaussian input 3x32x32, resmlp d=256 depth 4),
batch 128, Adam. Each rule trains ``--epochs`` epochs of ``--steps`` batches (the first a
warm-up) with its protocol callbacks off (the protocol is timed on its own, below); every 20
framework steps, 20 reference steps run in the same process, so each pair of segments sees the
same machine state. ms/step is the median segment time over 20; the ratio is the median of the
paired ratios.

Peak memory: the most a step holds at once (parameters, gradients, optimizer state, activations
and temporaries), over a few direct steps of each arm (lcredit's training step without the
Lightning loop, and the reference step): from the profiler's memory timeline on a CPU
(torch.profiler), from the allocator's peak on CUDA.

The protocol's cost is measured on the default run (dfa, ladder, 15 epochs): its own timer's
share of the run, and best-of-N wall time with and without the callback.
"""
import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

import lcredit.train as lt
from lcredit.build import build_rule, fit_task
import reference
from lcredit.data import build_task
from lcredit.models.base import compile_mode

REPO = Path(__file__).resolve().parents[1]
STEP_K = 20  # steps per timed segment
WARMUP = 3   # steps before a memory measurement

# bench row -> (lcredit overrides, reference loop). fa is the original study's (blockwise) FA;
# cb runs its rule phase throughout (its 20% DFA warm-up would time DFA's step instead).
RULES = {
    "bp": (["method=bp"], "bp"),
    "frozen": (["method=frozen"], "frozen"),
    "dfa": (["method=dfa"], "dfa"),
    "fa": (["method=fa"], "fa_blockwise"),
    "fa_layerwise": (["method=fa", "method.variant=layerwise"], "fa_layerwise"),
    "ep": (["method=ep"], "ep"),
    "sb": (["method=sb"], "sb"),
    "cb": (["method=cb", "method.warmup_ratio=0"], "cb"),
    "vec": (["method=vec"], "vec"),
    "blend": (["method=blend"], "blend"),
    # the compiled step (trainer.compile=true: reduce-overhead on CUDA, inductor's default on
    # a CPU) against the same eager reference
    "bp+compile": (["method=bp", "trainer.compile=true"], "bp"),
    "dfa+compile": (["method=dfa", "trainer.compile=true"], "dfa"),
}
TASKS = {
    "default": ("ladder_lowdim, resmlp d=128 depth 4 (the default run's)", []),
    "cifar": ("gaussian_images 3x32x32, resmlp d=256 depth 4 (CIFAR-shaped)",
              ["data=gaussian_images", "data.n_train=20000", "data.n_test=2000", "model.d=256",
               "model.depth=4"]),
}
TARGETS = {"ratio": 1.10, "memory_ratio": 1.30, "protocol_share": 0.05,
           "cheap_share_of_epoch": 0.01}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compose_cfg(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


class PlainLoop:
    """The reference arm: its own model (same init as lcredit's), state, optimizer and
    on-device permutations of the task's training set."""

    def __init__(self, name, cfg, task, batch_size, device):
        torch.manual_seed(int(cfg.seed))
        self.name, self.batch_size, self.device = name, batch_size, device
        self.model = instantiate(cfg.model, input_shape=task.input_shape,
                                 num_classes=task.num_classes).to(device)
        self.state = reference.make_state(name, self.model, task.num_classes)
        self.opt = torch.optim.Adam(reference.param_groups(name, self.model, self.state), lr=1e-3)
        self.x, self.y = task.x_train.to(device), task.y_train.to(device)
        self.gen = torch.Generator(device=device).manual_seed(int(cfg.seed))
        self.order, self.pos = None, 0

    def batch(self):
        if self.order is None or self.pos >= len(self.x):
            self.order = torch.randperm(len(self.x), generator=self.gen, device=self.device)
            self.pos = 0
        idx = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.x[idx], self.y[idx]

    def step(self, x, y):
        reference.STEPS[self.name](self.model, self.state, self.opt, x, y)

    def steps(self, k: int) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(k):
            self.step(*self.batch())
        sync(self.device)
        return time.perf_counter() - t0


class Interleave(L.Callback):
    """Every STEP_K framework steps, runs STEP_K reference steps: each pair of segments sees the
    same machine state. The framework's segment is everything between two such points: its loop,
    hooks, logging and step."""

    def __init__(self, plain: PlainLoop):
        self.plain, self.pairs, self._t0 = plain, [], None

    def _start(self, device):
        sync(device)
        self._t0 = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module):
        self._start(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % STEP_K:
            return
        sync(pl_module.device)
        fw = time.perf_counter() - self._t0
        self.pairs.append((trainer.current_epoch, fw, self.plain.steps(STEP_K)))
        self._start(pl_module.device)


# ----------------------------------------------------------------------------- memory
def peak_bytes(make_step, batches, device) -> int:
    """The most memory one of these steps holds at once (after one warm-up step, so the
    optimizer's state exists): on CUDA, the allocator's peak above what the process held
    before the arm was built (its parameters, optimizer state and step); on a CPU, the
    profiler's timeline of the tensors the steps touch (the same things)."""
    gc.collect()  # the last run's garbage is not freed inside the measured steps
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
    step = make_step()
    for x, y in batches[:WARMUP]:  # optimizer state; a compiled arm's compile and graph capture
        step(x, y)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        for x, y in batches[WARMUP:]:
            step(x, y)
        sync(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        for x, y in batches[WARMUP:]:
            step(x, y)
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(device)
    return int(max(sum(s) for s in sizes))


def lcredit_step(cfg, task, device):
    """lcredit's training step without the Lightning loop (``Rule.update``)."""
    torch.manual_seed(int(cfg.seed))
    rule = build_rule(cfg, task).to(device)
    rule.compile_model(compile_mode(cfg.trainer.get("compile", False), device, rule.model))
    opt = rule.make_optimizer()
    return lambda x, y: rule.update(x, y, opt)


def memory_pair(cfg, task, plain_name, device) -> dict:
    """Peak bytes of lcredit's training step (``Rule.update``: training_step's math) and of the reference step, each arm alone on the device."""
    gen = torch.Generator().manual_seed(1)
    idx = [torch.randint(len(task.x_train), (128,), generator=gen) for _ in range(WARMUP + 2)]
    batches = [(task.x_train[i], task.y_train[i]) for i in idx]
    fw = peak_bytes(lambda: lcredit_step(cfg, task, device), batches, device)
    ref = peak_bytes(lambda: PlainLoop(plain_name, cfg, task, 128, device).step, batches, device)
    return {"framework_peak_mb": fw / 2**20, "plain_peak_mb": ref / 2**20,
            "memory_ratio": fw / ref}


# ----------------------------------------------------------------------------- timing
def bench_rule(rule, task_name, args, device, out_dir) -> dict:
    overrides, plain_name = RULES[rule]
    cfg = compose_cfg([*overrides, *TASKS[task_name][1], *device_overrides(device),
                       f"trainer.max_epochs={args.epochs}",
                       f"+trainer.limit_train_batches={args.steps}", "seed=0",
                       f"paths.output_dir={out_dir}", "protocol.frozen_baseline=null",
                       "protocol.abort.enabled=false", "protocol.print_report=false",
                       "~callbacks.protocol_monitor", "~callbacks.early_abort", "logger=csv",
                       "trainer.enable_progress_bar=false"])
    torch._dynamo.reset()  # each compiled row compiles afresh, within its own variant budget
    task = fit_task(cfg, build_task(cfg.data)).to(device)
    inter = Interleave(PlainLoop(plain_name, cfg, task, int(cfg.data.batch_size), device))
    lt.train(cfg, extra_callbacks=[inter])
    pairs = [(fw, plain) for epoch, fw, plain in inter.pairs if epoch >= 1]  # epoch 0: warm-up
    ratios = [f / p for f, p in pairs]
    row = {"task": task_name, "rule": rule, "reference": plain_name,
           "overrides": overrides, "pairs": len(pairs),
           "framework_ms": 1e3 * statistics.median(f for f, _ in pairs) / STEP_K,
           "plain_ms": 1e3 * statistics.median(p for _, p in pairs) / STEP_K,
           "ratio": statistics.median(ratios),
           "ratio_iqr": statistics.quantiles(ratios, n=4)[::2] if len(ratios) > 1 else ratios * 2,
           "segments_s": pairs}
    row |= memory_pair(cfg, task, plain_name, device)
    print(f"{task_name}/{rule}: lcredit {row['framework_ms']:.2f} ms, reference "
          f"{row['plain_ms']:.2f} ms, ratio {row['ratio']:.3f}, memory {row['memory_ratio']:.2f}x",
          flush=True)
    return row


def device_overrides(device) -> list[str]:
    return ["trainer=gpu"] if device.type == "cuda" else []


def time_protocol(repeats, out_dir, device):
    """The default run (abort off so both arms train every epoch; no frozen baseline run) with
    and without the measuring callback, alternating arms."""
    arms = {"with": [], "without": []}
    for i in range(repeats):
        for arm in ("with", "without"):
            extra = [] if arm == "with" else ["~callbacks.protocol_monitor", "~callbacks.early_abort"]
            cfg = compose_cfg(["protocol.abort.enabled=false", "protocol.frozen_baseline=null",
                               "protocol.print_report=false", *device_overrides(device),
                               f"paths.output_dir={out_dir}/{arm}{i}", *extra])
            r = lt.train(cfg)
            arms[arm].append({"wall_s": r["wall_time_s"], "protocol_s": r["protocol_time_s"],
                              "epoch_s": statistics.median(h["train_time_s"] for h in r["history"]),
                              **r.get("protocol_cost", {})})
    # Best of the repeats: on a shared machine the minimum is the least disturbed run.
    w = min(a["wall_s"] for a in arms["with"])
    wo = min(a["wall_s"] for a in arms["without"])
    share = statistics.median(a["protocol_s"] / a["wall_s"] for a in arms["with"])
    runs = [a for a in arms["with"] if a.get("cheap_count")]
    cheap = statistics.median(a["cheap_seconds"] / a["cheap_count"] for a in runs) if runs else None
    full = statistics.median(a["full_seconds"] / a["full_count"] for a in runs) if runs else None
    epoch = statistics.median(a["epoch_s"] for a in arms["with"])
    return {"runs": arms, "wall_with_s": w, "wall_without_s": wo, "ab_ratio": w / wo,
            "protocol_share": share, "target_share": TARGETS["protocol_share"],
            "epoch_s": epoch, "cheap_s": cheap, "full_s": full,
            "cheap_share_of_epoch": cheap / epoch if cheap is not None else None,
            "hooked": time_hooked(device)}


def time_hooked(device, epochs: int = 3):
    """lcredit.Protocol on a module of the user's (the default run's ResMLP inside a plain
    LightningModule trained by backprop, a torch DataLoader): the cost of a cheap and of a full
    measurement through hooks, against an epoch of that module's training."""
    from torch.utils.data import DataLoader, TensorDataset

    from lcredit import Protocol
    from lcredit.models.resmlp import ResMLP

    task = build_task(compose_cfg([]).data)

    class User(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = ResMLP(task.input_shape, task.num_classes, d=128, depth=4)
            g = torch.Generator().manual_seed(0)
            self.register_buffer("B", torch.randn(5, task.num_classes, 128, generator=g) / 128**0.5)

        def forward(self, x):
            return self.net(x)

        def lcredit_credit(self, x, y):  # DFA's credit, for the full measurement
            with torch.no_grad():
                out = self(x)
                e = out.softmax(1) - torch.nn.functional.one_hot(y, out.shape[1]).to(out.dtype)
            return [e @ self.B[l].to(e.dtype) for l in range(5)]

        def training_step(self, batch, _):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    class EpochTimer(L.Callback):
        def __init__(self):
            self.times = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):  # before the Protocol's measurement
            self.times.append(time.perf_counter() - self.t0)

    timer = EpochTimer()
    protocol = Protocol(blocks="net.blocks.*", every_n_epochs=2, abort={"enabled": False})
    loader = DataLoader(TensorDataset(task.x_train, task.y_train), batch_size=128, shuffle=True)
    trainer = L.Trainer(max_epochs=epochs, callbacks=[timer, protocol], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        accelerator="gpu" if device.type == "cuda" else "cpu")
    trainer.fit(User(), loader)
    kinds = [r["kind"] for r in protocol.reports]
    epoch = statistics.median(timer.times)
    return {"epoch_s": epoch, "measurements": kinds, "seconds": protocol.state["seconds"],
            "full_s": protocol.state.get("full_seconds"), "cheap_s": protocol.state.get("cheap_seconds"),
            "full_per_epoch": (protocol.state.get("full_seconds") or 0) / max(kinds.count("full"), 1) / epoch,
            "cheap_per_epoch": (protocol.state.get("cheap_seconds") or 0) / max(kinds.count("cheap"), 1) / epoch}


# ----------------------------------------------------------------------------- report
def checks(report) -> list[str]:
    """The issue's targets, each with the figure that meets or misses it."""
    out = []
    for task in report["tasks"]:
        rows = [r for r in report["rows"] if r["task"] == task]
        by = {r["rule"]: r for r in rows}
        slow = [f"{r['rule']} {r['ratio']:.2f}" for r in rows if r["ratio"] > TARGETS["ratio"]]
        heavy = [f"{r['rule']} {r['memory_ratio']:.2f}" for r in rows
                 if r["memory_ratio"] > TARGETS["memory_ratio"]]
        out.append(f"{task}: every rule ≤ {TARGETS['ratio']:.2f}× its reference: "
                   + ("met" if not slow else "missed by " + ", ".join(slow)))
        out.append(f"{task}: peak memory ≤ {TARGETS['memory_ratio']:.2f}×: "
                   + ("met" if not heavy else "missed by " + ", ".join(heavy)))
        if "dfa" in by and "bp" in by:
            d, b = by["dfa"]["framework_ms"], by["bp"]["framework_ms"]
            out.append(f"{task}: dfa ≤ bp per step: {'met' if d <= b else 'missed'} "
                       f"({d:.2f} vs {b:.2f} ms)")
    p = report.get("protocol_overhead")
    if p:
        out.append(f"default run: protocol ≤ {100 * TARGETS['protocol_share']:.0f}% of the run: "
                   f"{'met' if p['protocol_share'] <= TARGETS['protocol_share'] else 'missed'} "
                   f"({100 * p['protocol_share']:.1f}%)")
        c = p.get("cheap_share_of_epoch")
        if c is not None:
            out.append(f"default run: the every-epoch measurement ≤ "
                       f"{100 * TARGETS['cheap_share_of_epoch']:.0f}% of an epoch: "
                       f"{'met' if c <= TARGETS['cheap_share_of_epoch'] else 'missed'} "
                       f"({100 * c:.2f}%)")
    return out


def render(report: dict, out: Path) -> None:
    """docs/bench.md from the figures in docs/bench.json."""
    s = report["setup"]
    lines = [f"Measured {s['date']} on {s['device_name']} ({s['threads']} threads), torch "
             f"{s['torch']}, commit {s['commit']}: `{s['command']}` ({out.with_suffix('.json').name})."]
    for m in s.get("merged", []):
        rerun = sorted({f"{r['task']}/{r['rule']}" for r in report["rows"]
                        if r.get("commit") == m["commit"] and r.get("date") == m["date"]})
        lines[0] += (f" Rerun {m['date']} at commit {m['commit']} (`{m['command']}`): "
                     f"{', '.join(rerun) or 'the protocol figures'}.")
    for task in report["tasks"]:
        lines += ["", f"**{task}**: {TASKS[task][0]}, batch 128, Adam", "",
                  "| rule | lcredit ms/step | reference ms/step | ratio (target ≤ 1.10) | "
                  "interquartile range | peak MB lcredit / reference | memory ratio (≤ 1.30) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['rule']} | {r['framework_ms']:.2f} | {r['plain_ms']:.2f} | "
                  f"{r['ratio']:.3f} | {r['ratio_iqr'][0]:.3f}–{r['ratio_iqr'][1]:.3f} | "
                  f"{r['framework_peak_mb']:.1f} / {r['plain_peak_mb']:.1f} | "
                  f"{r['memory_ratio']:.2f} |"
                  for r in report["rows"] if r["task"] == task]
    p = report.get("protocol_overhead")
    if p:
        n = len(p["runs"]["with"])
        lines += ["", "| default run (dfa, ladder, 15 epochs) | value |", "|---|---|",
                  f"| protocol's own time / the run's wall time, timed in-run (target ≤ 5%) | "
                  f"{100 * p['protocol_share']:.1f}% |",
                  f"| wall time with / without the callback, best of {n} separate runs "
                  f"(machine noise between runs dominates this one) | "
                  f"{p['wall_with_s']:.1f}s / {p['wall_without_s']:.1f}s "
                  f"({100 * (p['ab_ratio'] - 1):+.1f}%) |"]
        if p.get("cheap_s") is not None:
            lines += [f"| an epoch's training (median) | {p['epoch_s']:.2f}s |",
                      f"| the every-epoch measurement (norms, (a), (b)): seconds / share of an "
                      f"epoch (target ≤ 1%) | {1000 * p['cheap_s']:.1f} ms / "
                      f"{100 * p['cheap_share_of_epoch']:.2f}% |",
                      f"| a full measurement (the sizes of docs/metrics.md: rho 1024 × 32 in float64, 20 null "
                      f"draws, (c) on 10 batches) | {p['full_s']:.2f}s "
                      f"({p['full_s'] / p['epoch_s']:.2f} epochs) |"]
        h = p.get("hooked")
        if h:
            lines += [f"| lcredit.Protocol on a user's LightningModule (the same ResMLP, a torch "
                      f"DataLoader), through hooks: every-epoch / full measurement, in epochs of "
                      f"its training | {100 * h['cheap_per_epoch']:.2f}% / "
                      f"{h['full_per_epoch']:.2f} epochs |"]
    lines += ["", "Targets:", ""] + [f"- {c}" for c in checks(report)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--epochs", type=int, default=2, help="epochs per rule (the first: warm-up)")
    ap.add_argument("--steps", type=int, default=200, help="training batches per epoch")
    ap.add_argument("--out", default=None, help="default: docs/bench (cpu), docs/bench_cuda")
    ap.add_argument("--readme", help="also copy the table into this README, between its markers")
    ap.add_argument("--protocol-only", action="store_true",
                    help="time only the protocol (no step rows) and merge it into --out's json")
    ap.add_argument("--protocol-repeats", type=int, default=3,
                    help="repeats of the default run with/without the protocol (0: skip)")
    ap.add_argument("--merge", action="store_true",
                    help="replace only these rows (and, when timed, the protocol figures) in the "
                         "existing .json; each row keeps the commit and date it was measured at")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite the .md (and README) from the existing .json; no timing")
    args = ap.parse_args()
    out = Path(args.out or REPO / "docs" / ("bench" if args.device == "cpu" else "bench_cuda"))
    if args.protocol_only:
        if not out.with_suffix(".json").is_file():
            ap.error(f"--protocol-only: no {out.with_suffix('.json')} to merge into")
        report = json.loads(out.with_suffix(".json").read_text())
        with tempfile.TemporaryDirectory() as tmp:
            report["protocol_overhead"] = time_protocol(max(args.protocol_repeats, 1), tmp,
                                                        torch.device(args.device))
        report["setup"]["merged"] = report["setup"].get("merged", []) + [{
            "device": args.device, "commit": commit(), "date": time.strftime("%Y-%m-%d"),
            "command": "python scripts/bench.py " + " ".join(sys.argv[1:])}]
        report["checks"] = checks(report)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2))
        args.render_only = True
    if not args.render_only:
        unknown = [r for r in args.rules.split(",") if r not in RULES]
        unknown += [t for t in args.tasks.split(",") if t not in TASKS]
        if unknown:
            ap.error(f"unknown rule or task: {', '.join(unknown)} (rules: {', '.join(RULES)}; "
                     f"tasks: {', '.join(TASKS)})")
        if args.epochs < 2:
            ap.error("--epochs must be >= 2 (the first epoch is a warm-up)")
        if args.steps < 2 * STEP_K:
            ap.error(f"--steps must be >= {2 * STEP_K}")
        if args.merge and not out.with_suffix(".json").is_file():
            ap.error(f"--merge: no {out.with_suffix('.json')} to merge into")
        if args.device == "cuda" and not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device here")
        device = torch.device(args.device)
        tasks = args.tasks.split(",")
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for task in tasks:
                for rule in args.rules.split(","):
                    rows.append(bench_rule(rule, task, args, device, Path(tmp) / task / rule)
                                | {"commit": commit(), "date": time.strftime("%Y-%m-%d")})
                    # what a timed-out run leaves: every row finished so far
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.with_suffix(".partial.json").write_text(json.dumps(rows, indent=2))
            protocol = (time_protocol(args.protocol_repeats, tmp, device)
                        if args.protocol_repeats else None)
        name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"{platform.node()} ({platform.machine()} CPU)")
        report = {"setup": {"device": args.device, "device_name": name, "tasks": tasks,
                            "epochs": args.epochs, "steps_per_epoch": args.steps,
                            "batch_size": 128, "threads": torch.get_num_threads(),
                            "torch": torch.__version__, "commit": commit(),
                            "command": "python scripts/bench.py " + " ".join(sys.argv[1:]),
                            "date": time.strftime("%Y-%m-%d")},
                  "tasks": tasks, "targets": TARGETS, "rows": rows, "protocol_overhead": protocol}
        if args.merge:
            old = json.loads(out.with_suffix(".json").read_text())
            if old["setup"]["device"] != args.device:
                ap.error(f"--merge: {out.with_suffix('.json')} was measured on "
                         f"{old['setup']['device']}, not {args.device}")
            new = {(r["task"], r["rule"]): r for r in rows}
            rows = [new.pop((r["task"], r["rule"]), r) for r in old["rows"]] + list(new.values())
            order = {t: i for i, t in enumerate(TASKS)}
            rows.sort(key=lambda r: (order[r["task"]], list(RULES).index(r["rule"])))
            old["setup"]["merged"] = old["setup"].get("merged", []) + [report["setup"]]
            report = old | {"rows": rows, "protocol_overhead": protocol or old["protocol_overhead"],
                            "tasks": [t for t in TASKS if any(r["task"] == t for r in rows)]}
        report["checks"] = checks(report)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2))
        out.with_suffix(".partial.json").unlink(missing_ok=True)
    if not out.with_suffix(".json").is_file():
        ap.error(f"{out.with_suffix('.json')}: no figures to render (run without --render-only)")
    report = json.loads(out.with_suffix(".json").read_text())
    render(report, out)
    if args.readme:
        from readme_table import update

        marker = "bench_cuda" if report["setup"]["device"] == "cuda" else "bench"
        update(Path(args.readme), out.with_suffix(".md").read_text(), marker)


if __name__ == "__main__":
    main()
