"""Shrink a failing fuzz recipe to the few steps that still show the mismatch.

Delta debugging on the recipe's DAG: keep one failing output, then repeatedly either
make an argument of the output's step the output, or *cut* a step — replace its value
by a fresh input holding that value (rounded to float32), which drops everything
upstream of it — and keep the change when the backend still disagrees with the
references.  What remains is the smallest chain this greedy
search finds, printed by `Recipe.describe()`.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from . import fuzz as F


def _prune(r):
    """Drop the steps and inputs no output depends on."""
    need = set(r.outputs)
    for vid, _, args, _ in reversed(r.steps):
        if vid in need:
            need.update(args)
    return dataclasses.replace(
        r, inputs=[i for i in r.inputs if i[0] in need],
        steps=[s for s in r.steps if s[0] in need], rejected=[])


def _recompute(r):
    vals = {vid: (v.astype(np.float64) if kind == "f" else v) for vid, _, kind, v in r.inputs}
    with np.errstate(all="ignore"):
        for vid, op, args, attrs in r.steps:
            vals[vid] = F.ref_step(op, [vals[a] for a in args], attrs)
    return dataclasses.replace(r, ref=vals)


def _cut(r, vid):
    """The recipe with step `vid` replaced by an input holding its value."""
    v = r.ref[vid]
    kind = "i" if v.dtype.kind in "iu" else "f"
    value = v.astype(np.int64) if kind == "i" else v.astype(np.float32)
    steps = [s for s in r.steps if s[0] != vid]
    return _recompute(_prune(dataclasses.replace(
        r, inputs=r.inputs + [(vid, v.shape, kind, value)], steps=steps)))


def fails(r, backend) -> bool:
    try:
        stats = F.check_batch([r], (backend,), fd=False)
    except Exception:           # a crash of the reduced case is a different failure
        return False
    return any(f.backend in (backend, "numpy-f64") for f in stats.mismatches)


def minimize(recipe, backend, max_tries=200):
    """A smaller recipe on which `backend` still mismatches (the recipe itself if
    none is found)."""
    r = recipe
    if len(r.outputs) > 1:
        for k, o in enumerate(r.outputs):
            one = _prune(dataclasses.replace(r, outputs=[o], proj=[r.proj[k]]))
            if fails(one, backend):
                r = one
                break
    tries, changed = 0, True
    rng = np.random.default_rng([recipe.seed, 7])
    while changed and tries < max_tries:
        changed = False
        # an argument of the output step as the output instead (a new projection)
        (out,) = r.outputs
        step = next((s for s in r.steps if s[0] == out), None)
        for a in (step[2] if step else []):
            if r.ref[a].dtype.kind != "f":
                continue
            tries += 1
            proj = rng.standard_normal(r.ref[a].shape).astype(np.float32)
            cand = _prune(dataclasses.replace(r, outputs=[a], proj=[proj]))
            if fails(cand, backend):
                r, changed = cand, True
                break
        if changed:
            continue
        for vid, *_ in list(reversed(r.steps)):
            if vid in r.outputs:
                continue
            tries += 1
            cand = _cut(r, vid)
            if fails(cand, backend):
                r, changed = cand, True
                break
    return r


def without_padding_windows(r):
    """The recipe without its outputs that hold -inf (max-pool windows lying wholly in
    padding), or None when every output does.  Re-checking it tells whether a seed's
    mismatches all come from those windows."""
    keep = [k for k, o in enumerate(r.outputs) if not np.isneginf(r.ref[o]).any()]
    if not keep:
        return None
    return _prune(dataclasses.replace(r, outputs=[r.outputs[k] for k in keep],
                                      proj=[r.proj[k] for k in keep]))
