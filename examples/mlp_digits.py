"""A multilayer perceptron on the bundled 8x8 handwritten digits.

Defines the model with graphc.nn, compiles one training step (forward,
backward and the Adam update in a single call), trains with a progress bar
and reports the held-out accuracy.

Run:  python examples/mlp_digits.py [--epochs 10] [--backend numpy|llvm] [--save mlp.npz]
"""
import argparse

import numpy as np

import graphc as gc
from graphc import data, nn, optim, train


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--save", help="write the trained weights to this .npz file")
    args = ap.parse_args(argv)

    xtr, ytr = data.load_digits("train")           # (1437, 1, 8, 8) float32 in [0, 1]
    xte, yte = data.load_digits("test")            # (360, 1, 8, 8), a fixed held-out split

    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Flatten(),
                          nn.Linear(64, 128, rng=rng), nn.ReLU(),
                          nn.Linear(128, 64, rng=rng), nn.ReLU(),
                          nn.Linear(64, 10, rng=rng))
    x = gc.input("x", (None, 1, 8, 8))              # None: the batch size, bound per call
    y = gc.input("y", (None,), dtype="int64")
    opt = optim.Adam(model.parameters(), lr=args.lr)
    step = opt.compile_step(lambda xb, yb: gc.cross_entropy(model(xb), yb), x, y,
                            backend=args.backend)

    hist = train.fit(model, step, (xtr, ytr), epochs=args.epochs, batch_size=32,
                     eval_data=(xte, yte), backend=args.backend)
    print(f"MLP test accuracy after {args.epochs} epochs: {hist['accuracy'][-1]:.2%}")
    if args.save:
        model.save(args.save)
        print("weights saved to", args.save)
    return hist


if __name__ == "__main__":
    main()
