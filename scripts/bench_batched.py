"""The repeated passes, batched against looped: what stacking them in the batch dimension buys.

    python scripts/bench_batched.py [--device cpu|cuda]   # writes docs/bench_batched{,_cuda}.json/.md

On the CIFAR-shaped model of scripts/bench.py (resmlp d=256 depth 4, batch 128), each repeated
pass lcredit makes is timed as lcredit runs it (one pass over all the copies stacked in the
batch dimension) and as the plain loop it replaces (one pass per copy), on the same inputs, with
the same result (checked):

- vec (and blend): the 2M perturbed forward passes of its finite-difference targets, per layer;
- cb: the K noisy samples of its bridge targets, per layer;
- the protocol's rho: its perturbation directions through the network, per layer;
- the protocol's null draws (dfa): every redrawn feedback's credit from one forward pass, against
  one rule copy per draw.

ep's relaxation sweeps are not here: each sweep starts from the states the last one left, so
they cannot run side by side (within a sweep, each block's forward runs once for all layers).
"""
import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from lcredit.diagnostics import metrics as M
from lcredit.models import ResMLP
from lcredit.models.base import hidden_states, run_blocks
from lcredit.rules import CB, DFA
from lcredit.rules.vec import directional_targets

REPO = Path(__file__).resolve().parents[1]


def timed(fn, device, repeats):
    """Median seconds of ``repeats`` calls (after one warm-up call) and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def loss_from(model, l, h, y):
    with torch.no_grad():
        return M.ce_per_sample(model.readout(run_blocks(model, h, start=l)[-1]), y)


def per_layer(draw, batched, looped, layers, device):
    """The two forms of one repeated pass: for each layer l, the same noise ``draw(gen, l)``
    (from a generator seeded alike for both) evaluated by ``batched(l, noise)`` or
    ``looped(l, noise)``."""
    def run(evaluate):
        def form():
            gen = torch.Generator(device=device).manual_seed(0)
            with torch.no_grad():
                return [evaluate(l, draw(gen, l)) for l in range(layers)]
        return form
    return run(batched), run(looped)


def vec_targets(model, states, y, m):
    """2M perturbed forward passes per layer (central differences, M directions)."""
    eps = 1e-3
    return per_layer(
        lambda gen, l: torch.randn((m, *states[l].shape), generator=gen, device=gen.device),
        lambda l, u: directional_targets(model, l, states[l], y, u, eps, M.ce_per_sample),
        lambda l, u: torch.stack([(loss_from(model, l, states[l] + eps * u[i], y)
                                   - loss_from(model, l, states[l] - eps * u[i], y)) / (2 * eps)
                                  for i in range(m)]),
        len(states), states[0].device)


def cb_targets(rule, states, s):
    """The value at K noisy copies of h_{l+1}, per layer (bridge_noise=target)."""
    k, sigma = rule.K, rule.sigma
    return per_layer(
        lambda gen, l: torch.randn((k, *states[l + 1].shape), generator=gen, device=gen.device),
        lambda l, xi: rule.value((states[l + 1][None] + sigma * xi).flatten(0, 1), l + 1,
                                 s.repeat(k, 1)).view(k, -1).mean(0),
        lambda l, xi: torch.stack([rule.value(states[l + 1] + sigma * xi[i], l + 1, s)
                                   for i in range(k)]).mean(0),
        len(states) - 1, states[0].device)


def rho_pairs(model, states, credits, y, directions, device):
    """The protocol's rho: ``directions`` perturbations per sample through the network."""
    def batched():
        gen = torch.Generator().manual_seed(0)
        return [M.perturbation_pairs(model, l, h, a, y, directions=directions, generator=gen)[1]
                for l, (h, a) in enumerate(zip(states, credits))]

    def looped():
        gen = torch.Generator().manual_seed(0)
        out = []
        for l, h in enumerate(states):
            hd = h.double()
            delta = torch.randn((directions, *hd.shape), generator=gen, dtype=hd.dtype).to(device)
            delta = delta * (1e-3 / delta.flatten(2).norm(dim=2))[..., None]
            base = loss_from(model, l, hd, y)
            out.append(torch.stack([loss_from(model, l, hd + delta[i], y) - base
                                    for i in range(directions)]))
        return out

    return batched, looped


def null_draws(rule, x, y, draws):
    """The chance level's redrawn feedback: one forward pass for all draws, or a copy each."""
    def batched():
        gen = torch.Generator().manual_seed(0)
        return rule.feedback_draws(draws, gen).credit_sets(x, y)

    def looped():
        gen = torch.Generator().manual_seed(0)
        out = []
        for _ in range(draws):
            c = copy.deepcopy(rule)
            c.draw_feedback(gen)
            out.append(c.credit(x, y))
        return out

    return batched, looped


def flat(t) -> list:
    return [u for v in t for u in (flat(v) if isinstance(v, (list, tuple)) else [v])]


def close(a, b, atol) -> bool:
    return all(torch.allclose(p, q, rtol=1e-4, atol=atol) for p, q in zip(flat(a), flat(b)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--readme", help="also copy the table into this README, between its markers")
    args = ap.parse_args()
    device = torch.device(args.device)
    out = Path(args.out or REPO / "docs" / ("bench_batched" if args.device == "cpu"
                                            else "bench_batched_cuda"))
    torch.manual_seed(0)
    shape, n = (3, 32, 32), 128
    x, y = torch.randn(n, *shape, device=device), torch.randint(0, 10, (n,), device=device)
    model = ResMLP(shape, 10, d=256, depth=4).to(device)
    with torch.no_grad():
        states = hidden_states(model, x)
    cb = CB(copy.deepcopy(model), shape, 10).to(device)
    s = torch.softmax(model(x), -1) - torch.nn.functional.one_hot(y, 10)
    dfa = DFA(copy.deepcopy(model), shape, 10).to(device).double()
    xd = x.double()
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        states64 = hidden_states(model64, xd)
    credits64 = dfa.credit(xd, y)
    # (pass, what, the two forms, the agreement expected): vec's targets are float32 loss
    # differences over 2 eps = 2e-3, so a loss rounded differently in a batch of another size
    # (~1e-7 relative) moves a target by up to ~1e-3.
    cases = [("vec, blend", "2M = 8 perturbed forward passes per layer (M = 4)",
              vec_targets(model, states, y, 4), 2e-3),
             ("cb", "K = 4 noisy samples of the bridge target per layer",
              cb_targets(cb, states, s), 1e-6),
             ("protocol: rho", "32 directions per sample (docs/metrics.md's), float64",
              rho_pairs(model64, states64, credits64, y, 32, device), 1e-10),
             ("protocol: null draws (dfa)", "20 redrawn feedbacks (docs/metrics.md's), float64",
              null_draws(dfa, xd, y, 20), 1e-10)]
    rows = []
    for name, what, (batched, looped), atol in cases:
        tb, rb = timed(batched, device, args.repeats)
        tl, rl = timed(looped, device, args.repeats)
        rows.append({"pass": name, "what": what, "batched_ms": 1e3 * tb, "looped_ms": 1e3 * tl,
                     "speedup": tl / tb, "same_result": close(rb, rl, atol),
                     "atol": atol})
        print(rows[-1], flush=True)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.node()} ({platform.machine()} CPU)")
    report = {"setup": {"device_name": name, "threads": torch.get_num_threads(),
                        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                        "model": "resmlp d=256 depth 4, input 3x32x32, batch 128"},
              "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    lines = ["| repeated pass | what | batched ms | looped ms | speed-up | same result |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['pass']} | {r['what']} | {r['batched_ms']:.1f} | {r['looped_ms']:.1f} | "
              f"{r['speedup']:.2f}× | {'yes' if r['same_result'] else 'NO'} (to {r['atol']:.0e}) |" for r in rows]
    s_ = report["setup"]
    lines += ["", f"Measured {s_['date']} on {s_['device_name']} ({s_['threads']} threads), "
                  f"{s_['model']}: `python scripts/bench_batched.py --device {args.device}` "
                  f"({out.with_suffix('.json').name})."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.readme:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from readme_table import update

        update(Path(args.readme), out.with_suffix(".md").read_text(), out.name)


if __name__ == "__main__":
    main()
