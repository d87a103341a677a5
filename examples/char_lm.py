"""A character-level LSTM language model trained on Shakespeare's sonnets
(examples/data/sonnets.txt, public domain), then sampled one character at a
time with the state carried between calls (streaming inference).

    python examples/char_lm.py [--steps 300] [--sample 200]
"""
import argparse
import os

import numpy as np

import graphc as gc
from graphc import nn, optim

TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sonnets.txt")


class CharLM(nn.Module):
    def __init__(self, vocab, hidden=128, seed=0):
        super().__init__()
        self.embed = nn.Embedding(vocab, 32)
        self.lstm = nn.LSTM(32, hidden, rng=seed)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, chars):                        # (T, N) int64
        out, _ = self.lstm(self.embed(chars))        # (T, N, H)
        return self.head(out)                        # (T, N, vocab)

    def step(self, char, h, c):                      # one character, state carried
        y, (h2, c2) = self.lstm.step(self.embed(char), (h, c))
        return self.head(y), h2, c2


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq-len", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--sample", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", choices=["numpy", "llvm"], default="llvm")
    args = ap.parse_args(argv)
    nn.manual_seed(args.seed)
    text = open(TEXT, encoding="utf-8").read()
    vocab = sorted(set(text))
    idx = {ch: i for i, ch in enumerate(vocab)}
    data = np.array([idx[ch] for ch in text], dtype=np.int64)
    V, T = len(vocab), args.seq_len
    freq = np.bincount(data, minlength=V) / len(data)
    unigram = float(-(freq * np.log(freq)).sum())   # the loss of the best context-free guess

    model = CharLM(V, seed=args.seed)
    # Time and batch are both left symbolic: the reshape merges them into one
    # dimension "N*T", and the compiled step specializes on the sizes it is given.
    x = gc.input("x", ("T", None), dtype="int64")
    y = gc.input("y", ("T", None), dtype="int64")

    def loss_fn(xb, yb):
        logits = model(xb)
        return gc.cross_entropy(gc.reshape(logits, (-1, V)), gc.reshape(yb, (-1,)))
    step = optim.Adam(model.parameters(), lr=5e-3).compile_step(loss_fn, x, y,
                                                                backend=args.backend)

    rng = np.random.default_rng(args.seed)
    recent = []
    for i in range(args.steps):
        starts = rng.integers(0, len(data) - T - 1, size=args.batch_size)
        xb = np.stack([data[s:s + T] for s in starts], axis=1)
        yb = np.stack([data[s + 1:s + T + 1] for s in starts], axis=1)
        loss = step(xb, yb)
        recent.append(float(loss))
        if i % 50 == 0 or i == args.steps - 1:
            print(f"step {i}: loss {loss:.3f} (unigram entropy of the text: {unigram:.3f} nats)")

    # Streaming sampler: one compiled step, the LSTM state fed back each call.
    ch = gc.input("ch", (1,), dtype="int64")
    h = gc.input("h", (1, 1, 128))
    c = gc.input("c", (1, 1, 128))
    logits, h2, c2 = model.step(ch, h, c)
    sample = gc.compile([ch, h, c], [gc.softmax(logits, axis=-1), h2, c2], backend=args.backend)
    hv, cv = model.lstm.initial_state(1)
    cur, out = idx["S"], ["S"]
    for _ in range(args.sample):
        p, hv, cv = sample(np.array([cur]), hv, cv)
        p = p[0].astype(np.float64)
        cur = int(rng.choice(V, p=p / p.sum()))
        out.append(vocab[cur])
    print("sample:\n" + "".join(out))
    return float(np.mean(recent[-20:])), unigram


if __name__ == "__main__":
    main()
