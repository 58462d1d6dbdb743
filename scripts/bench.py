"""Seconds per training epoch: lcredit (Lightning + Hydra config + shared local update) next to a
minimal plain-PyTorch loop doing the same math, in one run on one machine.

    python scripts/bench.py            # writes docs/bench.json and docs/bench.md

Input: CIFAR-shaped Gaussian data (3x32x32, 50,000 samples), resmlp d=256 depth 4, batch 128,
Adam. Every 20 framework steps, 20 plain steps run in the same process, so each pair of
segments sees the same machine state; epoch 1 is a warm-up. The figure is the median of the
paired ratios (s/epoch: median segment time scaled to an epoch). The protocol's cost is measured on the
default run, in-run (its own timer) and as best-of-N wall time with and without the callback.
"""
import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import lcredit.train as lt
import reference
from lcredit.data.synthetic import gaussian_images
from lcredit.models import ResMLP

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------- the plain reference loops
# scripts/reference.py: each rule's math as a minimal loop (tests/test_reference.py holds
# lcredit to it). The fa timed here is Lillicrap's layerwise FA.
PLAIN = {"bp": "bp", "dfa": "dfa", "fa": "fa_layerwise"}


class PlainLoop:
    """The plain reference for one rule: its own model, feedback, optimizer and permutations."""

    def __init__(self, rule, task, batch_size, d, depth, seed):
        torch.manual_seed(seed)
        self.rule, self.task, self.batch_size = rule, task, batch_size
        self.model = ResMLP(task.input_shape, 10, d=d, depth=depth)
        if rule == "dfa":
            self.feedback = [torch.randn(10, d) / d**0.5 for _ in range(depth + 1)]
        else:
            self.feedback = {m: torch.empty_like(m.weight).uniform_(-1, 1) / m.weight.shape[1] ** 0.5
                             for b in self.model.blocks for m in (b.fc1, b.fc2)}
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.pos = None, 0

    def steps(self, k: int) -> float:
        """Time k training steps, continuing through on-device permutations like an epoch."""
        t0 = time.perf_counter()
        x, y = self.task.x_train, self.task.y_train
        for _ in range(k):
            if self.order is None or self.pos >= len(x):
                self.order, self.pos = torch.randperm(len(x), generator=self.gen), 0
            idx = self.order[self.pos:self.pos + self.batch_size]
            self.pos += self.batch_size
            reference.STEPS[PLAIN[self.rule]](self.model, self.feedback, self.opt, x[idx], y[idx])
        return time.perf_counter() - t0


class Interleave(L.Callback):
    """Every ``k`` framework steps, runs ``k`` plain steps in the same process: each pair of
    segments sees the same machine state (this host is shared and noisy). The framework's
    segment time is everything between two such points — its loop, hooks, logging and step."""

    def __init__(self, plain: PlainLoop, k: int = 20):
        self.plain, self.k = plain, k
        self.pairs, self._t0 = [], None

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % self.k:
            return
        fw = time.perf_counter() - self._t0
        plain = self.plain.steps(self.k)
        self.pairs.append((trainer.current_epoch, fw, plain))
        self._t0 = time.perf_counter()


def time_pair(rule, task, epochs, n_train, d, depth, seed, out_dir):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            # the plain fa loop is Lillicrap's layerwise FA
            f"method={rule}", *(["method.variant=layerwise"] if rule == "fa" else []),
            "data=gaussian_images", f"data.n_train={n_train}",
            "data.n_test=2000", f"model.d={d}", f"model.depth={depth}",
            f"trainer.max_epochs={epochs}", f"seed={seed}", f"paths.output_dir={out_dir}",
            "protocol.frozen_baseline=null", "protocol.abort.enabled=false",
            "protocol.print_report=false"])
    inter = Interleave(PlainLoop(rule, task, 128, d, depth, seed))
    results = lt.train(cfg, extra_callbacks=[inter])
    pairs = [(fw, plain) for epoch, fw, plain in inter.pairs if epoch >= 1]  # epoch 0: warm-up
    return [r["train_time_s"] for r in results["history"]], pairs


def time_protocol(repeats, out_dir):
    """The default run (abort off so both arms train every epoch; no frozen baseline run) with
    and without the measuring callback, alternating arms. Returns both arms' figures."""
    arms = {"with": [], "without": []}
    for i in range(repeats):
        for arm in ("with", "without"):
            GlobalHydra.instance().clear()
            extra = [] if arm == "with" else ["~callbacks.protocol_monitor", "~callbacks.early_abort"]
            with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
                cfg = compose("config", overrides=[
                    "protocol.abort.enabled=false", "protocol.frozen_baseline=null",
                    "protocol.print_report=false", f"paths.output_dir={out_dir}/{arm}{i}", *extra])
            r = lt.train(cfg)
            arms[arm].append({"wall_s": r["wall_time_s"], "protocol_s": r["protocol_time_s"]})
    # Best of the repeats: on a shared machine the minimum is the least disturbed run.
    w = min(a["wall_s"] for a in arms["with"])
    wo = min(a["wall_s"] for a in arms["without"])
    in_run = statistics.median(a["protocol_s"] / (a["wall_s"] - a["protocol_s"]) for a in arms["with"])
    return {"runs": arms, "wall_with_s": w, "wall_without_s": wo, "ab_ratio": w / wo,
            "in_run_overhead": in_run, "target_overhead": 0.05}


def render(report: dict, out: Path) -> None:
    """docs/bench.md from the figures in docs/bench.json."""
    rows, protocol = report["rows"], report.get("protocol_overhead")
    lines = ["| rule | lcredit s/epoch | plain PyTorch s/epoch | ratio: median of paired "
             "20-step segments (target ≤ 1.10) | interquartile range | pairs |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['rule']} | {r['framework_s_per_epoch']:.2f} | {r['plain_s_per_epoch']:.2f} | "
              f"{r['ratio']:.3f} | {r['ratio_iqr'][0]:.3f}–{r['ratio_iqr'][1]:.3f} | {r['pairs']} |"
              for r in rows]
    if protocol:
        n = len(protocol["runs"]["with"])
        lines += ["", "| default run (dfa, ladder, 15 epochs) | value |", "|---|---|",
                  f"| protocol's own time / rest of the run, timed in-run (target ≤ 5%) | "
                  f"{100 * protocol['in_run_overhead']:.1f}% |",
                  f"| wall time with / without the callback, best of {n} separate runs "
                  f"(machine noise between runs dominates this one) | "
                  f"{protocol['wall_with_s']:.1f}s / {protocol['wall_without_s']:.1f}s "
                  f"({100 * (protocol['ab_ratio'] - 1):+.1f}%) |"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", default="bp,dfa,fa")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=50000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--out", default=str(REPO / "docs" / "bench"))
    ap.add_argument("--readme", help="also copy the table into this README, between its markers")
    ap.add_argument("--protocol-repeats", type=int, default=3,
                    help="repeats of the default run with/without the protocol (0: skip)")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite the .md (and README) from the existing .json; no timing")
    args = ap.parse_args()
    if args.render_only:
        out = Path(args.out)
        render(json.loads(out.with_suffix(".json").read_text()), out)
        if args.readme:
            from readme_table import update

            update(Path(args.readme), out.with_suffix(".md").read_text())
        return
    if args.epochs < 2:
        ap.error("--epochs must be >= 2 (the first epoch is a warm-up)")

    task = gaussian_images(n_train=args.n_train, n_test=2000)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rule in args.rules.split(","):
            epochs, pairs = time_pair(rule, task, args.epochs, args.n_train, args.d, args.depth,
                                      0, Path(tmp) / rule)
            steps_per_epoch = -(-args.n_train // 128)
            ratios = [f / p for f, p in pairs]
            fw_s = statistics.median(f for f, _ in pairs) / 20 * steps_per_epoch
            plain_s = statistics.median(p for _, p in pairs) / 20 * steps_per_epoch
            rows.append({"rule": rule, "framework_s_per_epoch": fw_s, "plain_s_per_epoch": plain_s,
                         "ratio": statistics.median(ratios), "pairs": len(pairs),
                         "ratio_iqr": statistics.quantiles(ratios, n=4)[::2],
                         "framework_epoch_times_s": epochs, "segments_s": pairs})
            print(f"{rule}: framework {fw_s:.2f}s plain {plain_s:.2f}s ratio {rows[-1]['ratio']:.3f}")
        protocol = time_protocol(args.protocol_repeats, tmp) if args.protocol_repeats else None
    report = {"setup": {"input": "gaussian_images 3x32x32", "n_train": args.n_train,
                        "model": f"resmlp d={args.d} depth={args.depth}", "batch_size": 128,
                        "epochs": args.epochs, "threads": torch.get_num_threads(),
                        "torch": torch.__version__, "machine": platform.machine(),
                        "processor": platform.processor() or None, "date": time.strftime("%Y-%m-%d")},
              "target_ratio": 1.10, "rows": rows, "protocol_overhead": protocol}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    render(report, out)
    if args.readme:
        from readme_table import update

        update(Path(args.readme), out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
