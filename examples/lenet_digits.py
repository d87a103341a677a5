"""LeNet-5 (LeCun et al. 1998) on handwritten digits.

conv 6@5x5 -> pool -> conv 16@5x5 -> pool -> 120 -> 84 -> 10.  By default it
trains on the bundled digits upscaled to 28x28; give a directory of MNIST
(or Fashion-MNIST) IDX files with --mnist to train on those instead.  With
--render DIR it also draws the forward and the training graph into DIR.

Run:  python examples/lenet_digits.py [--epochs 8] [--mnist DIR] [--limit N] [--render DIR]
"""
import argparse
import os

import numpy as np

import graphc as gc
from graphc import data, models, optim, train


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--mnist", metavar="DIR", help="directory of MNIST IDX files (.gz or raw)")
    ap.add_argument("--limit", type=int, help="use only the first N training images")
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--render", metavar="DIR", help="write forward/training graph PNGs here")
    args = ap.parse_args(argv)

    if args.mnist:
        (xtr, ytr), (xte, yte) = data.load_mnist(args.mnist, "train"), \
            data.load_mnist(args.mnist, "test")
    else:
        (xtr, ytr), (xte, yte) = data.load_digits("train", size=28), \
            data.load_digits("test", size=28)
    if args.limit:
        xtr, ytr = xtr[:args.limit], ytr[:args.limit]
    print(f"training on {len(xtr)} images {xtr.shape[1:]}, testing on {len(xte)}")

    model = models.lenet5(rng=np.random.default_rng(0))
    print(model)
    x = gc.input("x", (None, 1, 28, 28))
    y = gc.input("y", (None,), dtype="int64")
    opt = optim.Adam(model.parameters(), lr=args.lr)
    step = opt.compile_step(lambda xb, yb: gc.cross_entropy(model(xb), yb), x, y,
                            backend=args.backend)
    hist = train.fit(model, step, (xtr, ytr), epochs=args.epochs, batch_size=32,
                     eval_data=(xte, yte), backend=args.backend)
    print(f"LeNet-5 test accuracy after {args.epochs} epochs: {hist['accuracy'][-1]:.2%}")

    if args.render:
        os.makedirs(args.render, exist_ok=True)
        loss = gc.cross_entropy(model(x), y)
        print("wrote", gc.render(loss, os.path.join(args.render, "lenet_forward.png")))
        print("wrote", gc.render(step, os.path.join(args.render, "lenet_train_step.svg")))
    return hist


if __name__ == "__main__":
    main()
