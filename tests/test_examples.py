"""The examples run as scripts (quick settings) and print what they promise."""
import os
import re
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def run_example(name, *args, cwd=None):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args],
                       capture_output=True, text=True, env=env, cwd=cwd or ROOT, timeout=300)
    assert r.returncode == 0, f"{name} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_conv_worked_example_prints_course_result(tmp_path):
    out = run_example("conv_worked_example.py", "--render", str(tmp_path / "conv.svg"))
    rows = re.findall(r"\[\s*(-?\d+)\s+(-?\d+)\s+(-?\d+)\]", out.split("output:")[1])
    assert [tuple(map(int, r)) for r in rows[:2]] == [(10, 7, 4), (27, 24, 21)]
    assert "matches the worked example" in out
    assert "conv2d" in (tmp_path / "conv.svg").read_text()


def test_mlp_digits_one_epoch(tmp_path):
    out = run_example("mlp_digits.py", "--epochs", "1", "--save", str(tmp_path / "w.npz"))
    acc = float(re.search(r"MLP test accuracy after 1 epochs: ([\d.]+)%", out).group(1))
    assert 50 < acc <= 100           # one epoch of Adam on real digits learns a lot
    with np.load(tmp_path / "w.npz", allow_pickle=False) as z:
        assert z["1.weight"].shape == (128, 64)


def test_lenet_reads_mnist_idx_files(tmp_path):
    """LeNet-5 on a tiny MNIST-format directory (written here), plus its graph pictures."""
    from graphc import data
    rng = np.random.default_rng(0)
    d = tmp_path / "mnist"
    d.mkdir()
    for prefix, n in (("train", 48), ("t10k", 16)):
        data.write_idx(d / f"{prefix}-images-idx3-ubyte.gz",
                       rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gzip=True)
        data.write_idx(d / f"{prefix}-labels-idx1-ubyte",
                       rng.integers(0, 10, n, dtype=np.uint8))
    out = run_example("lenet_digits.py", "--epochs", "1", "--mnist", str(d),
                      "--render", str(tmp_path / "pics"))
    assert "training on 48 images (1, 28, 28), testing on 16" in out
    assert re.search(r"LeNet-5 test accuracy after 1 epochs: [\d.]+%", out)
    assert (tmp_path / "pics" / "lenet_forward.png").read_bytes()[:4] == b"\x89PNG"
    svg = (tmp_path / "pics" / "lenet_train_step.svg").read_text()
    # the training step, drawn as an overview: a box per module and its gradient, the
    # optimizer update as one box
    assert "gradient of conv1 (Conv2d)" in svg and "conv2d_grad_weight" in svg
    assert "optimizer update" in svg


def test_vanishing_gradients_shows_sigmoid_gradients_shrinking(tmp_path):
    pic = tmp_path / "van.svg"
    out = run_example("vanishing_gradients.py", "--steps", "2", "--out", str(pic))
    table = re.findall(r"^\s+fc(\d+) \|\s+(\S+)\s+(\S+) \|\s+(\S+)\s+(\S+)$", out, flags=re.M)
    assert len(table) == 9
    sig_init = [float(r[1]) for r in table]
    relu_init = [float(r[3]) for r in table]
    # sigmoid: the first layer's gradient is orders of magnitude below the last one's
    assert sig_init[0] < 1e-2 * sig_init[-1]
    # relu with the same initialization: no such collapse
    assert relu_init[0] > 0.1 * relu_init[-1]
    svg = pic.read_text()
    assert re.search(r"\|grad weight\| = [\d.e+-]+", svg) and "gradient norm (log scale)" in svg


def test_rnn_digit_rows_reaches_90_percent():
    out = run_example("rnn_digits_rows.py", "--epochs", "3")
    acc = float(re.search(r"epoch 3: loss [\d.]+\s+test accuracy ([\d.]+)", out).group(1))
    assert 0.9 <= acc <= 1.0         # a GRU reading 8 rows of 8 pixels (issue 6's bar)


def test_char_lm_learns_well_below_the_unigram_entropy():
    out = run_example("char_lm.py", "--steps", "150", "--sample", "20")
    losses = [float(v) for v in re.findall(r"step \d+: loss ([\d.]+)", out)]
    unigram = float(re.search(r"unigram entropy of the text: ([\d.]+)", out).group(1))
    # the model starts near the uniform guess (log of the vocabulary, above the
    # unigram entropy) and its loss falls well below the unigram entropy
    assert losses[0] > unigram and losses[-1] < 0.75 * unigram, (losses, unigram)
    sample = out.split("sample:")[1].strip("\n")
    assert len(sample) >= 20
