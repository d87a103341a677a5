"""The benchmark harness's timing rules (graphc/bench: interleaved), checked by
counting calls, not by wall-clock thresholds."""
import time

from graphc import bench


def _counted(sleep=0.0):
    calls = []

    def fn():
        calls.append(time.perf_counter())
        if sleep:
            time.sleep(sleep)
    return fn, calls


def test_short_calls_are_timed_in_blocks_and_settled_between_frameworks():
    fast, fast_calls = _counted()
    slow, slow_calls = _counted(0.003)
    res = bench.interleaved({"graphc-llvm": fast, "torch": slow}, repeat=3, warmup=2,
                            min_time=2e-3, settle=0.004)
    assert set(res) == {"graphc-llvm", "torch"}
    # a 3-ms call is timed singly, after at least one untimed call per round
    assert len(slow_calls) >= 2 + 3 * 2
    assert res["torch"] >= 0.003          # time.sleep sleeps at least that long
    # a call of a few microseconds runs in blocks of many per timed sample
    assert len(fast_calls) > 2 + 3 * 10
    assert res["graphc-llvm"] < res["torch"]


def test_numpy_peers_and_solo_mode_run_in_rounds_of_their_own(monkeypatch):
    order = []

    def make(name):
        def fn():
            order.append(name)
            time.sleep(0.0025)     # above min_time: one call per timed sample
        return fn
    impls = {"graphc-llvm": make("g"), "graphc-numpy": make("n"), "torch": make("t")}
    bench.interleaved(impls, repeat=2, warmup=1, settle=0.0)
    # the NumPy interpreter's calls all come after the interleaved g/t rounds
    first_n = order.index("n")
    assert set(order[:first_n]) == {"g", "t"} and set(order[first_n:]) == {"n"}
    order.clear()
    monkeypatch.setattr(bench, "_SOLO_ALL", True)
    bench.interleaved({"graphc-llvm": make("g"), "torch": make("t")}, repeat=2, warmup=1)
    assert order == ["g"] * 3 + ["t"] * 3      # warm-up + 2 rounds each, no settling
