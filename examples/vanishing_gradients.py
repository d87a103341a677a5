"""Why deep networks were hard to train: vanishing gradients, seen in numbers and pictures.

Two 8-layer MLPs, identical except for the activation, learn the bundled 8x8
digits with the same optimizer.  The sigmoid's derivative is at most 1/4, so
each sigmoid layer shrinks the backward signal and the first layers' weight
gradients are orders of magnitude smaller than the last ones'; ReLU passes
the gradient through unchanged where it is active.  The script prints each
layer's gradient norm from a real batch before and after training, the test
accuracy of both networks, and renders the sigmoid network's training graph
with every parameter coloured by its gradient norm (log scale).

Run:  python examples/vanishing_gradients.py [--steps 300] [--out vanishing.png]
"""
import argparse

import numpy as np

import graphc as gc
from graphc import data, models, nn, optim, train
from graphc.viz import gradient_values

DEPTH, WIDTH = 8, 32


def layer_norms(model, loss, x, y, xb, yb):
    grads = gradient_values(loss, [x, y], [xb, yb], params=model.parameters())
    return [float(np.linalg.norm(g)) for p, g in grads.items() if p.label().endswith("weight")]


def run(activation, steps, xtr, ytr, xte, yte, lr, seed):
    rng = np.random.default_rng(seed)
    model = models.mlp(64, hidden=(WIDTH,) * DEPTH, activation=activation, rng=rng)
    # Same He (Kaiming) initialization for both nets, so only the activation differs.
    for name, p in model.named_parameters():
        if name.endswith("weight"):
            nn.init.kaiming_normal_(p, nonlinearity="relu", rng=rng)
        else:
            nn.init.zeros_(p)
    x = gc.input("x", (None, 1, 8, 8))
    y = gc.input("y", (None,), dtype="int64")
    loss = gc.cross_entropy(model(x), y)
    probe = (xtr[:256], ytr[:256])                    # the batch the norms are measured on
    before = layer_norms(model, loss, x, y, *probe)
    step = optim.SGD(model.parameters(), lr=lr, momentum=0.9).compile_step(
        lambda a, b: gc.cross_entropy(model(a), b), x, y)
    batches = data.DataLoader((xtr, ytr), 32, seed=seed)
    done = 0
    while done < steps:
        for xb, yb in batches:
            step(xb, yb)
            done += 1
            if done == steps:
                break
    after = layer_norms(model, loss, x, y, *probe)
    acc = train.evaluate(model, (xte, yte))
    return model, loss, x, y, before, after, acc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="SGD steps per network")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="vanishing_gradients.png",
                    help="picture of the sigmoid net's training graph ('' to skip)")
    args = ap.parse_args(argv)

    xtr, ytr = data.load_digits("train")
    xte, yte = data.load_digits("test")
    results = {a: run(a, args.steps, xtr, ytr, xte, yte, args.lr, args.seed)
               for a in ("sigmoid", "relu")}

    print(f"{DEPTH}-hidden-layer MLPs ({WIDTH} units), {args.steps} SGD steps each")
    print("weight-gradient norm per layer (first -> last), at initialization and after training:")
    print(f"{'layer':>6} | {'sigmoid init':>12} {'trained':>10} | {'relu init':>10} "
          f"{'trained':>10}")
    s, r = results["sigmoid"], results["relu"]
    for i in range(DEPTH + 1):
        print(f"{'fc' + str(i + 1):>6} | {s[4][i]:12.2e} {s[5][i]:10.2e} | {r[4][i]:10.2e} "
              f"{r[5][i]:10.2e}")
    for a, res in results.items():
        ratio = res[4][0] / res[4][-1]
        print(f"{a:>7}: first/last layer gradient ratio at init {ratio:.1e}, "
              f"test accuracy after training {res[6]:.1%}")

    if args.out:
        model, loss, x, y = s[:4]
        grads = gradient_values(loss, [x, y], [xtr[:256], ytr[:256]], params=model.parameters())
        path = gc.render(loss, args.out, backward=True, grad_values=grads,
                         title="deep sigmoid MLP: gradient norms per parameter (blue = vanishing)")
        print("training graph with gradient norms written to", path)
    return results


if __name__ == "__main__":
    main()
