"""Seconds per training epoch: lcredit (Lightning + Hydra config + shared local update) next to a
minimal plain-PyTorch loop doing the same math, in one run on one machine.

    python scripts/bench.py            # writes docs/bench.json and docs/bench.md

Input: CIFAR-shaped Gaussian data (3x32x32, 50,000 samples), resmlp d=256 depth 4, batch 128,
Adam. The first epoch of each is a warm-up and is not counted; the figure is the median of the
others. Framework and plain loop alternate per rule so machine noise hits both alike.
"""
import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import lcredit.train as lt
from lcredit.data.synthetic import gaussian_images
from lcredit.models import ResMLP

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------- the plain reference loops
class FeedbackLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, fb):
        ctx.save_for_backward(x, fb)
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, fb = ctx.saved_tensors
        return g @ fb, g.T @ x, g.sum(0), None


def plain_epoch(rule, model, feedback, opt, x, y, batch_size, gen):
    order = torch.randperm(len(x), generator=gen)
    for start in range(0, len(x), batch_size):
        idx = order[start:start + batch_size]
        xb, yb = x[idx], y[idx]
        opt.zero_grad(set_to_none=True)
        if rule in ("bp", "fa"):
            # fa (layerwise): one graph whose block linears use fixed random feedback backward.
            h = model.embed(xb)
            for block in model.blocks:
                if rule == "fa":
                    f = block.ln(h)
                    f = FeedbackLinearFn.apply(f, block.fc1.weight, block.fc1.bias, feedback[id(block.fc1)])
                    f = FeedbackLinearFn.apply(block.act(f), block.fc2.weight, block.fc2.bias,
                                               feedback[id(block.fc2)])
                    h = h + f
                else:
                    h = block(h)
            F.cross_entropy(model.readout(h), yb).backward()
        else:  # dfa: graph cut at every block; e·B_l as each block's output gradient
            h0 = model.embed(xb)
            outs, h = [], h0.detach()
            for block in model.blocks:
                h = block(h)
                outs.append(h)
                h = h.detach()
            logits = model.readout(h)
            loss = F.cross_entropy(logits, yb)
            e = (torch.softmax(logits.detach(), -1) - F.one_hot(yb, 10)) / len(yb)
            torch.autograd.backward([loss, h0, *outs], [None] + [e @ B for B in feedback])
        opt.step()


def time_plain(rule, task, epochs, batch_size, d, depth, seed):
    torch.manual_seed(seed)
    model = ResMLP(task.input_shape, 10, d=d, depth=depth)
    if rule == "dfa":
        feedback = [torch.randn(10, d) / d**0.5 for _ in range(depth + 1)]
    else:
        feedback = {id(m): torch.empty_like(m.weight).uniform_(-1, 1) / m.weight.shape[1] ** 0.5
                    for b in model.blocks for m in (b.fc1, b.fc2)}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        plain_epoch(rule, model, feedback, opt, task.x_train, task.y_train, batch_size, gen)
        times.append(time.perf_counter() - t0)
    return times


def time_framework(rule, epochs, n_train, d, depth, seed, out_dir):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            f"method={rule}", "data=gaussian_images", f"data.n_train={n_train}",
            "data.n_test=2000", f"model.d={d}", f"model.depth={depth}",
            f"trainer.max_epochs={epochs}", f"seed={seed}", f"paths.output_dir={out_dir}"])
    results = lt.train(cfg)
    return [r["train_time_s"] for r in results["history"]]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", default="bp,dfa,fa")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=50000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--out", default=str(REPO / "docs" / "bench"))
    args = ap.parse_args()
    if args.epochs < 2:
        ap.error("--epochs must be >= 2 (the first epoch is a warm-up)")

    task = gaussian_images(n_train=args.n_train, n_test=2000)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rule in args.rules.split(","):
            fw = time_framework(rule, args.epochs, args.n_train, args.d, args.depth, 0,
                                Path(tmp) / rule)
            plain = time_plain(rule, task, args.epochs, 128, args.d, args.depth, 0)
            fw_s, plain_s = statistics.median(fw[1:]), statistics.median(plain[1:])
            rows.append({"rule": rule, "framework_s_per_epoch": fw_s,
                         "plain_s_per_epoch": plain_s, "ratio": fw_s / plain_s,
                         "framework_epochs_s": fw, "plain_epochs_s": plain})
            print(f"{rule}: framework {fw_s:.2f}s plain {plain_s:.2f}s ratio {fw_s / plain_s:.3f}")
    report = {"setup": {"input": "gaussian_images 3x32x32", "n_train": args.n_train,
                        "model": f"resmlp d={args.d} depth={args.depth}", "batch_size": 128,
                        "epochs": args.epochs, "threads": torch.get_num_threads(),
                        "torch": torch.__version__, "machine": platform.machine(),
                        "processor": platform.processor() or None, "date": time.strftime("%Y-%m-%d")},
              "target_ratio": 1.10, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    lines = ["| rule | lcredit s/epoch | plain PyTorch s/epoch | ratio (target ≤ 1.10) |",
             "|---|---|---|---|"]
    lines += [f"| {r['rule']} | {r['framework_s_per_epoch']:.2f} | {r['plain_s_per_epoch']:.2f} | "
              f"{r['ratio']:.3f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
