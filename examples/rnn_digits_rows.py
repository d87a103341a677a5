"""A GRU reads each 8×8 digit row by row (8 steps of 8 pixels) and classifies it.

    python examples/rnn_digits_rows.py [--epochs 15] [--cell gru|lstm|rnn]

The time loop is one `scan` node in the graph (not 8 unrolled cells); its
gradient is backpropagation through time as a reverse loop.
"""
import argparse

import numpy as np

import graphc as gc
from graphc import nn, optim
from graphc.data import batches, load_digits


class RowReader(nn.Module):
    def __init__(self, cell="gru", hidden=64, seed=0):
        super().__init__()
        rnn_cls = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}[cell]
        self.rnn = rnn_cls(8, hidden, rng=seed)
        self.head = nn.Linear(hidden, 10)

    def forward(self, images):                      # (N, 1, 8, 8)
        rows = gc.transpose(gc.reshape(images, (images.shape[0], 8, 8)), (1, 0, 2))  # (T=8, N, 8)
        _, state = self.rnn(rows)
        h = state[0] if isinstance(state, tuple) else state
        return self.head(h[-1])                      # last layer's final hidden state


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--cell", choices=["gru", "lstm", "rnn"], default="gru")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    nn.manual_seed(args.seed)

    xtr, ytr = load_digits("train")
    xte, yte = load_digits("test")
    model = RowReader(args.cell, seed=args.seed)
    x = gc.input("x", (None, 1, 8, 8))
    y = gc.input("y", (None,), dtype="int64")
    step = optim.Adam(model.parameters(), lr=1e-2).compile_step(
        lambda xb, yb: gc.cross_entropy(model(xb), yb), x, y)
    model.eval()
    predict = gc.compile([x], gc.argmax(model(x), axis=1))
    for epoch in range(args.epochs):
        losses = [step(xb, yb) for xb, yb in batches((xtr, ytr), args.batch_size,
                                                    seed=args.seed, epoch=epoch)]
        acc = float(np.mean(predict(xte) == yte))
        print(f"epoch {epoch + 1}: loss {np.mean(losses):.4f}  test accuracy {acc:.3f}")
    return acc


if __name__ == "__main__":
    main()
