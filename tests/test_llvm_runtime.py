"""LLVM backend runtime: thread-count independence, the disk cache, the debug
bounds check, the profiler and the IR dump."""
import os

import numpy as np
import pytest

import graphc as gc
from graphc.backends import llvm as gllvm
from graphc.ir.errors import GraphcError
from graphc.ir.graph import Graph
from graphc.kernel import ir as K
from graphc.kernel.lower import lower_graph
from _issue13_graph import issue13_graph

RNG = np.random.default_rng(7)


def _workload():
    return issue13_graph(RNG)


def test_results_identical_across_thread_counts(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    inputs, outs, feeds = _workload()
    results = []
    for nt in ("1", "2", "3"):
        monkeypatch.setenv("GRAPHC_NUM_THREADS", nt)
        f = gc.compile(inputs, outs, backend="llvm")
        results.append(f(*feeds))
        assert gllvm.runners(f)[0].nthreads == int(nt)
    for other in results[1:]:
        for u, v in zip(results[0], other):
            np.testing.assert_array_equal(u, v)   # bitwise: same summation order


def _entries(root):
    """The object files of a cache directory (beside them: its secret.key)."""
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                  if f.endswith(".o"))


def test_disk_cache_hit_and_corrupt_entry(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    x = gc.input("x", (33,))
    y = gc.exp(x) * 2.0 + 1.0
    v = RNG.standard_normal(33).astype(np.float32)
    want = gc.compile([x], y)(v)
    np.testing.assert_allclose(gc.compile([x], y, backend="llvm")(v), want, rtol=1e-6)
    entries = _entries(tmp_path)
    assert len(entries) == 1
    # a second compile loads the entry (no new file) and computes the same values
    np.testing.assert_allclose(gc.compile([x], y, backend="llvm")(v), want, rtol=1e-6)
    assert _entries(tmp_path) == entries
    # corrupt it: ignored, rebuilt, rewritten
    with open(entries[0], "r+b") as fh:
        fh.seek(60)
        fh.write(b"\xff" * 64)
    np.testing.assert_allclose(gc.compile([x], y, backend="llvm")(v), want, rtol=1e-6)
    with open(entries[0], "wb") as fh:
        fh.write(b"garbage")
    np.testing.assert_allclose(gc.compile([x], y, backend="llvm")(v), want, rtol=1e-6)
    from graphc.backends.llvm import cache
    assert cache.read(os.path.basename(entries[0])[:-2]) is not None   # valid again


def test_debug_bounds_check_reports_kernel_and_index(monkeypatch):
    monkeypatch.setenv("GRAPHC_DEBUG_BOUNDS", "1")
    x = gc.input("x", (4,))
    y = gc.neg(x)
    graph = Graph([y], [x])
    prog = lower_graph(graph)
    # Sabotage the kernel: store to index i + 1 (the last iteration writes past the end).
    loop = prog.kernels[0].body[0]
    st = loop.body[0]
    loop.body[0] = K.Store(st.buf, K.add(st.index, 1), st.value)
    from graphc.backends.llvm.runtime import compile_program
    run = compile_program(prog, graph)
    with pytest.raises(GraphcError, match=r"bounds check failed in kernel k0_neg.*index 4 "
                                          r"outside a buffer of 4 elements"):
        run([np.ones(4, np.float32)])


def test_profile_and_kernel_listing(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAPHC_PROFILE", "1")
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    a = gc.input("a", (64, 64))
    f = gc.compile([a], gc.sum(gc.relu(a @ a), axis=1), backend="llvm")
    for _ in range(3):
        f(RNG.standard_normal((64, 64)).astype(np.float32))
    (r,) = gllvm.runners(f)
    names = [n for n, _ in r.kernels()]
    assert any("matmul" in n for n in names)
    prof = r.profile()
    assert len(prof) == len(names) and all(t >= 0 for _, _, t in prof)
    assert dict((n, fl) for n, fl, _ in prof)[names[0]] == 2 * 64 ** 3
    assert "matmul" in gllvm.profile_table(f)


def test_dump_writes_kernel_ir_llvm_ir_and_assembly(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAPHC_DUMP_LLVM", str(tmp_path))
    x = gc.input("x", (10,))
    gc.compile([x], gc.sigmoid(x), backend="llvm")(np.zeros(10, np.float32))
    files = set(os.listdir(tmp_path))
    assert {"graphc.kernels.txt", "graphc.ll", "graphc.opt.ll", "graphc.s"} <= files
    assert "sigmoid" in (tmp_path / "graphc.kernels.txt").read_text()
    assert "define" in (tmp_path / "graphc.ll").read_text()
