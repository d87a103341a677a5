"""The `graphc` command line: argument errors, render, a short training run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from graphc import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_main(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, needle", [
    (["frobnicate"], "invalid choice"),
    (["train"], "model"),
    (["train", "resnet"], "invalid choice"),
    (["train", "mlp", "--epochs", "0"], "--epochs"),
    (["train", "mlp", "--epochs", "two"], "--epochs"),
    (["train", "mlp", "--lr", "-1"], "--lr"),
    (["train", "mlp", "--backend", "tpu"], "--backend"),
    (["render", "mlp"], "-o"),
    (["train", "mlp", "--data", "imagenet"], "--data"),
    (["train", "lenet", "--data", "mnist:"], "mnist"),
])
def test_argument_errors_are_one_line_exit_2(capsys, tmp_path, argv, needle):
    code, out, err = run_main(capsys, *argv, *(["--out", str(tmp_path)]
                                               if argv[0] == "train" and len(argv) > 1
                                               and argv[1] in cli.MODELS else []))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert needle in lines[0]
    assert "Traceback" not in err + out


def test_missing_mnist_directory_is_one_line(capsys, tmp_path):
    missing = tmp_path / "no-such-dir"
    code, out, err = run_main(capsys, "train", "lenet", "--data", f"mnist:{missing}",
                              "--out", str(tmp_path / "o"))
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and str(missing) in err
    assert "Traceback" not in err


def test_corrupt_mnist_file_is_one_line(capsys, tmp_path):
    d = tmp_path / "mnist"
    d.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (d / name).write_bytes(b"\x00\x00\x08\x03\x00\x00")   # truncated header
    code, out, err = run_main(capsys, "train", "lenet", "--data", f"mnist:{d}",
                              "--out", str(tmp_path / "o"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_train_lenet_on_mnist_idx_files(capsys, tmp_path):
    from graphc import data
    rng = np.random.default_rng(0)
    d = tmp_path / "mnist"
    d.mkdir()
    for prefix, n in (("train", 40), ("t10k", 20)):
        data.write_idx(d / f"{prefix}-images-idx3-ubyte",
                       rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        data.write_idx(d / f"{prefix}-labels-idx1-ubyte.gz",
                       rng.integers(0, 10, n, dtype=np.uint8), gzip=True)
    out = tmp_path / "run"
    code, stdout, err = run_main(capsys, "train", "lenet", "--data", f"mnist:{d}", "--epochs",
                                 "1", "--batch-size", "16", "--no-render", "--out", str(out))
    assert code == 0, err
    assert f"MNIST from {d}: 40 train / 20 test" in stdout
    with np.load(out / "weights.npz", allow_pickle=False) as z:
        assert z["conv1.weight"].shape == (6, 1, 5, 5) and z["fc3.weight"].shape == (10, 84)


def test_console_entry_point_exit_status_without_traceback():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "graphc", "train", "mlp", "--epochs", "-3"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "graphc", "--help"], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 0 and "train" in r.stdout and "render" in r.stdout


def test_render_mlp_png(capsys, tmp_path):
    out = tmp_path / "tmp.png"
    code, stdout, err = run_main(capsys, "render", "mlp", "-o", str(out))
    assert code == 0, err
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert str(out) in stdout


def test_render_lenet_training_graph_svg(capsys, tmp_path):
    out = tmp_path / "train.svg"
    code, _, err = run_main(capsys, "render", "lenet", "-o", str(out), "--backward",
                            "--detail", "full")
    assert code == 0, err
    svg = out.read_text()
    for name in ("conv2d_grad_weight", "conv2d_grad_input", "max_pool2d", "parameter updates"):
        assert name in svg, name
    # by default: the overview, one box per module and one for the optimizer update
    code, _, err = run_main(capsys, "render", "lenet", "-o", str(tmp_path / "o.svg"),
                            "--backward")
    assert code == 0, err
    overview = (tmp_path / "o.svg").read_text()
    for name in ("conv1 (Conv2d)", "gradient of conv2 (Conv2d)", "optimizer update"):
        assert name in overview, name
    assert overview.count('class="node"') < svg.count('class="node"') // 5


@pytest.mark.parametrize("name", ["lenet.jpg", "x.bmp", "noext"])
def test_render_bad_extension_is_a_usage_error_with_cli_advice(capsys, tmp_path, name):
    code, _, err = run_main(capsys, "render", "lenet", "-o", str(tmp_path / name))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "use a name ending in .png, .svg or .pdf" in err
    assert "format=" not in err                      # Python-API advice has no place here
    assert not os.listdir(tmp_path)


def test_cuda_without_gpu_fails_before_training(capsys, tmp_path, monkeypatch):
    cuda = pytest.importorskip("graphc.backends.cuda")
    monkeypatch.delenv("GRAPHC_CUDA_EMULATE", raising=False)
    monkeypatch.setattr(cuda, "gpu_available", lambda: (False, "no CUDA driver (test)"))
    started = []
    def fake_fit(*a, **k):
        started.append(1)
        raise KeyboardInterrupt
    monkeypatch.setattr("graphc.train.fit", fake_fit)
    code, out, err = run_main(capsys, "train", "mlp", "--backend", "cuda", "--out",
                              str(tmp_path / "run"))
    assert code == 1 and not started
    assert "no usable GPU" in err and "no CUDA driver (test)" in err
    assert "epoch" not in out + err and "parameters" not in out


def test_every_option_has_help_text():
    import argparse
    parsers = [cli.make_parser()]
    for action in parsers[0]._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    from graphc import bench
    import contextlib, io
    with contextlib.redirect_stdout(io.StringIO()) as buf, pytest.raises(SystemExit):
        bench.main(["--help"])
    bench_help = buf.getvalue()
    for p in parsers:
        for a in p._actions:
            if a.option_strings and a.dest not in ("help", "version"):
                assert a.help, f"{p.prog} {a.option_strings} has no help text"
    for opt in ("--threads", "--repeat", "--conv-batch", "--sizes"):
        line = bench_help[bench_help.index("  " + opt):].split("\n  -")[0]
        assert len(line.split()) > 3, f"graphc bench {opt} has no help text"


def test_train_mlp_one_epoch_writes_weights_graphs_history(capsys, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run_main(capsys, "train", "mlp", "--epochs", "1", "--batch-size", "64",
                                 "--out", str(out), "--seed", "3")
    assert code == 0, err
    assert "epoch 1" in stdout and "accuracy" in stdout and "test accuracy" in stdout
    for name in ("forward.png", "backward.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    assert "<svg" in (out / "train_step.svg").read_text()
    hist = json.loads((out / "history.json").read_text())
    assert hist["config"]["epochs"] == 1 and len(hist["history"]["loss"]) == 1
    acc = hist["history"]["accuracy"][0]
    assert 0.5 < acc <= 1.0         # one epoch of a real MLP on real digits learns something
    # the saved weights load back into a fresh model and reproduce the accuracy
    from graphc import models, train, data
    model = models.mlp()
    with np.load(out / "weights.npz", allow_pickle=False) as z:
        assert set(z.files) == {n for n, _ in model.named_parameters()} | \
            {n for n, _ in model.named_buffers()}
    model.load(out / "weights.npz")
    xte, yte = data.load_digits("test")
    assert abs(train.evaluate(model, (xte, yte)) - acc) < 1e-9
    # curves.png needs matplotlib (optional); without it the run says so in one line
    try:
        import matplotlib  # noqa: F401
        assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
    except ImportError:
        assert "matplotlib is not installed" in stdout


def test_train_no_render_skips_pictures(capsys, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run_main(capsys, "train", "mlp", "--epochs", "1", "--no-render",
                                 "--out", str(out))
    assert code == 0, err
    assert (out / "weights.npz").exists()
    assert not (out / "forward.png").exists() and not (out / "backward.png").exists()


def test_no_plot_library_note_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # as if not installed
    out = tmp_path / "run"
    code, stdout, err = run_main(capsys, "train", "mlp", "--epochs", "1", "--no-render",
                                 "--out", str(out))
    assert code == 0, err
    notes = [ln for ln in stdout.splitlines() if "matplotlib is not installed" in ln]
    assert len(notes) == 1 and "graphc[plot]" in notes[0], stdout
    assert not (out / "curves.png").exists()


def test_plot_history_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = cli.plot_history({"loss": [2.0, 1.0, 0.5], "accuracy": [0.5, 0.8, 0.9]},
                            str(tmp_path / "c.png"), title="t")
    assert open(path, "rb").read(8) == PNG_MAGIC


def test_bench_forwards_arguments(capsys):
    code, out, err = run_main(capsys, "bench", "--help")
    assert code == 0 and "graphc bench" in out and "--only" in out


def test_bench_missing_module_is_explained(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "graphc.bench", None)   # import now fails
    import graphc
    monkeypatch.delattr(graphc, "bench", raising=False)
    code, out, err = run_main(capsys, "bench")
    assert code == 2 and "graphc.bench" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_docs_ops_to_stdout(capsys):
    code, out, err = run_main(capsys, "docs-ops")
    assert code == 0 and "| `conv2d` |" in out
