"""`Module`: the base of graphc's layers, and its state (parameters, buffers).

A module owns `gc.Parameter` objects and child modules, found by attribute
assignment (``self.weight = gc.Parameter(...)``, ``self.fc = nn.Linear(...)``).
Calling a module builds graph nodes (the graph is symbolic): ``model(x)``
runs ``forward`` inside ``gc.name_scope`` so a module's nodes cluster together
in pictures.

State:

- trainable parameters (``parameters()``) are what optimizers update;
- buffers (``buffers()``) are non-trainable Parameters (``trainable=False``):
  batch-norm running statistics, dropout keys;
- ``state_dict()`` holds both, under dotted names ("features.conv1.weight").

Train/eval mode changes what ``forward`` *builds*: in training mode batch norm
normalizes with batch statistics and emits new running statistics, dropout
draws masks.  Such state changes are recorded with ``register_state_update``
while the graph is built; ``optim``'s ``compile_step`` collects them (see
``collect_state_updates``) and turns them into the compiled step's updates, so
one call runs forward, backward, the optimizer update and the state updates.

Saving uses ``.npz`` archives (``np.savez``); loading uses
``np.load(allow_pickle=False)``, so a file can never execute code.  Loading
checks every key and shape before writing anything.
"""
from __future__ import annotations

import os
import threading
import weakref
import zipfile
from collections import OrderedDict, namedtuple
from contextlib import contextmanager

import numpy as np

from ..ir.dtypes import cast_checked
from ..ir.node import name_scope
from ..ir.shapes import shape_str
from ..tensor import Parameter

__all__ = ["Module", "StateDictError", "collect_state_updates", "load_npz", "save_npz",
           "OPTIM_PREFIX"]

OPTIM_PREFIX = "__optim__."   # keys of optimizer state stored next to a model's state

LoadResult = namedtuple("LoadResult", ["missing_keys", "unexpected_keys"])


class StateDictError(KeyError, ValueError):
    """A state dict or .npz file does not match the module (missing/extra key,
    wrong shape or dtype, unreadable file).  Both a KeyError and a ValueError."""

    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


# ------------------------------------------------------------------ state-update collection
class _Collectors(threading.local):
    def __init__(self):
        self.stack: list = []
        self.depth = 0          # nesting of Module.__call__


_tls = _Collectors()


@contextmanager
def collect_state_updates():
    """Collect {buffer Parameter: new value node} registered by modules built inside.

    ``optim`` wraps the loss function of ``compile_step`` in this, so batch-norm
    running statistics and dropout keys advance with every compiled step.
    """
    d: dict = {}
    _tls.stack.append(d)
    try:
        yield d
    finally:
        _tls.stack.remove(d)


_AUTO_NAMED = weakref.WeakSet()   # Parameters whose name the module system chose


def make_parameter(value, name=None, trainable=True, dtype=None) -> Parameter:
    """gc.Parameter, with 0-d values kept 0-d.

    Works around graphc/tensor.py storing np.ascontiguousarray(value), which
    turns a 0-d array into shape (1,) while the node's type says ().
    """
    p = Parameter(value, name=name, dtype=dtype, trainable=trainable)
    if p.value.shape != tuple(p.shape):
        p.value = p.value.reshape(p.shape)
    return p


def auto_named(p: Parameter) -> Parameter:
    """Mark `p`'s name as provisional: the module tree renames it to its dotted path."""
    _AUTO_NAMED.add(p)
    return p


class Module:
    """Base class of layers and models; override ``forward``."""

    def __new__(cls, *args, **kwargs):
        # Set up registries here so subclasses that forget super().__init__() work.
        self = object.__new__(cls)
        object.__setattr__(self, "_params", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_state_updates", {})
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_scope_label", cls.__name__)
        object.__setattr__(self, "_version", 0)
        return self

    def __init__(self):
        pass

    # ------------------------------------------------------------ registration
    def __setattr__(self, name, value):
        params, modules = self.__dict__["_params"], self.__dict__["_modules"]
        if isinstance(value, Parameter):
            modules.pop(name, None)
            self.__dict__.pop(name, None)
            params[name] = value
            self._touch()
        elif isinstance(value, Module):
            params.pop(name, None)
            self.__dict__.pop(name, None)
            modules[name] = value
            self._touch()
        else:
            if name in params or name in modules:
                if value is not None:
                    raise TypeError(f"cannot assign {type(value).__name__} to {name!r}: it holds "
                                    f"a {'Parameter' if name in params else 'Module'}")
                params.pop(name, None)
                modules.pop(name, None)
                self._touch()
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        d = self.__dict__
        if name in d.get("_params", ()):
            return d["_params"][name]
        if name in d.get("_modules", ()):
            return d["_modules"][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name):
        if name in self._params:
            del self._params[name]
            self._touch()
        elif name in self._modules:
            del self._modules[name]
            self._touch()
        else:
            object.__delattr__(self, name)

    def _touch(self):
        object.__setattr__(self, "_version", self.__dict__["_version"] + 1)

    def register_parameter(self, name: str, value) -> Parameter:
        """Add a trainable parameter (an array or a Parameter) under `name`."""
        if isinstance(value, Parameter):
            p = value
        else:
            p = auto_named(make_parameter(np.asarray(value), name=name))
        setattr(self, name, p)
        return p

    def register_buffer(self, name: str, value, dtype=None) -> Parameter:
        """Add non-trainable state (saved in state_dict, not updated by optimizers)."""
        if isinstance(value, Parameter):
            value.trainable = False
            p = value
        else:
            p = auto_named(make_parameter(
                np.asarray(value) if dtype is None else np.asarray(value, dtype=dtype),
                name=name, trainable=False))
        setattr(self, name, p)
        return p

    def add_module(self, name: str, module: "Module | None"):
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"add_module: {name!r} is a {type(module).__name__}, not a Module")
        setattr(self, name, module)

    # ------------------------------------------------------------ traversal
    def named_children(self):
        return iter(self._modules.items())

    def children(self):
        return iter(self._modules.values())

    def named_modules(self, prefix: str = ""):
        """(dotted name, module) for self ("") and every descendant, each once."""
        seen = set()

        def walk(m, pre):
            if id(m) in seen:
                return
            seen.add(id(m))
            yield pre, m
            for n, c in m._modules.items():
                if c is not None:
                    yield from walk(c, f"{pre}.{n}" if pre else n)
        yield from walk(self, prefix)

    def modules(self):
        return (m for _, m in self.named_modules())

    def _named_state(self, prefix=""):
        seen = set()
        for mname, m in self.named_modules(prefix):
            for n, p in m._params.items():
                if p is None or p.id in seen:
                    continue
                seen.add(p.id)
                yield (f"{mname}.{n}" if mname else n), p

    def named_parameters(self, prefix: str = ""):
        """(dotted name, Parameter) of every trainable parameter, each once."""
        return ((n, p) for n, p in self._named_state(prefix) if p.trainable)

    def parameters(self) -> list:
        """The trainable Parameters, in registration order (what optimizers take)."""
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix: str = ""):
        return ((n, p) for n, p in self._named_state(prefix) if not p.trainable)

    def buffers(self) -> list:
        return [p for _, p in self.named_buffers()]

    def num_parameters(self, trainable_only: bool = True) -> int:
        ps = self.parameters() if trainable_only else [p for _, p in self._named_state()]
        return int(sum(p.value.size for p in ps))

    def apply(self, fn):
        """Call fn(module) on every descendant (children first) and self."""
        for c in self.children():
            c.apply(fn)
        fn(self)
        return self

    # ------------------------------------------------------------ modes
    def train(self, mode: bool = True):
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self):
        return self.train(False)

    # ------------------------------------------------------------ building the graph
    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        if _tls.depth == 0:
            self._prepare_build()
        _tls.depth += 1
        try:
            with name_scope(self._scope_label):
                return self.forward(*args, **kwargs)
        finally:
            _tls.depth -= 1

    def _prepare_build(self):
        """At the outermost call: name parameters and scopes by their dotted paths,
        and forget state updates of a previous build."""
        for mname, m in self.named_modules():
            object.__setattr__(m, "_state_updates", {})
            object.__setattr__(m, "_calls", 0)
            if m is self:
                label = type(m).__name__
            else:
                label = f"{mname.rsplit('.', 1)[-1]}:{type(m).__name__}"
            object.__setattr__(m, "_scope_label", label)
        for name, p in self._named_state():
            if p.name is None or p in _AUTO_NAMED:
                p.name = name
                _AUTO_NAMED.add(p)

    def register_state_update(self, buffer: Parameter, new) -> None:
        """Record that a compiled training step should write `new` into `buffer`."""
        if buffer in self._state_updates:
            raise ValueError(f"{type(self).__name__}: state {buffer.label()} is updated twice "
                             "in one graph (a module with state called twice while training?)")
        self._state_updates[buffer] = new
        for d in _tls.stack:
            if buffer in d:
                raise ValueError(f"state {buffer.label()} is updated twice in one graph")
            d[buffer] = new

    def state_updates(self) -> dict:
        """{buffer: new value node} registered while the last graph was built."""
        out: dict = {}
        for m in self.modules():
            out.update(m._state_updates)
        return out

    # ------------------------------------------------------------ state dict
    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Copies of every parameter and buffer value, by dotted name."""
        return OrderedDict((n, _value(p)) for n, p in self._named_state())

    def load_state_dict(self, state, strict: bool = True) -> LoadResult:
        """Copy values from `state` (name → array) into the parameters and buffers.

        Every key, shape and dtype is checked before anything is written; with
        strict=True (default) missing and unexpected keys are errors too.
        Raises StateDictError naming the offending key.
        """
        own = OrderedDict(self._named_state())
        state = {k: v for k, v in state.items()}
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing key(s) {missing}")
            if unexpected:
                parts.append(f"unexpected key(s) {unexpected}")
            raise StateDictError(f"load_state_dict for {type(self).__name__}: "
                                 + "; ".join(parts))
        staged = []
        for k, p in own.items():
            if k not in state:
                continue
            staged.append((p, _checked_value(k, state[k], p)))
        for p, v in staged:
            _write(p, v)
        return LoadResult(missing, unexpected)

    def save(self, path, optimizer=None) -> None:
        """Write the state dict (and `optimizer`'s state, if given) to an .npz file."""
        sd = self.state_dict()
        if optimizer is not None:
            for k, v in optimizer.state_dict().items():
                sd[OPTIM_PREFIX + k] = v
        save_npz(path, sd)

    def load(self, path, strict: bool = True, optimizer=None) -> LoadResult:
        """Load a file written by `save`.  Never unpickles (allow_pickle=False).

        Optimizer entries in the file go to `optimizer` when it is given and
        are ignored otherwise.
        """
        data = load_npz(path)
        opt_state = {k[len(OPTIM_PREFIX):]: v for k, v in data.items()
                     if k.startswith(OPTIM_PREFIX)}
        model_state = {k: v for k, v in data.items() if not k.startswith(OPTIM_PREFIX)}
        if optimizer is not None:
            if not opt_state:
                raise StateDictError(f"{path}: holds no optimizer state")
            optimizer.state_dict_check(opt_state)
        try:
            result = self.load_state_dict(model_state, strict=strict)
        except StateDictError as e:
            raise StateDictError(f"{path}: {e}") from None
        if optimizer is not None:
            optimizer.load_state_dict(opt_state)
        return result

    # ------------------------------------------------------------ printing
    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        kids = [(n, c) for n, c in self._modules.items() if c is not None]
        if not kids:
            return lines[0] + ")"
        for n, c in kids:
            sub = repr(c).replace("\n", "\n  ")
            lines.append(f"  ({n}): {sub}")
        return "\n".join(lines) + "\n)"


# ------------------------------------------------------------------ helpers
def _value(p: Parameter) -> np.ndarray:
    """A copy of p's value, shaped as p's type says."""
    return p.value.reshape(p.shape).copy()


def _write(p: Parameter, arr: np.ndarray) -> None:
    p.set_value(np.asarray(arr).reshape(p.value.shape))


def _checked_value(key: str, value, p: Parameter) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype == object:
        raise StateDictError(f"state {key!r}: holds Python objects, not numbers")
    if arr.shape != tuple(p.shape):
        raise StateDictError(f"state {key!r}: expected shape {shape_str(p.shape)}, "
                             f"got {shape_str(arr.shape)}")
    if arr.dtype.kind not in "biuf" or not np.can_cast(arr.dtype, p.value.dtype, "same_kind"):
        raise StateDictError(f"state {key!r}: cannot load {arr.dtype} values into a "
                             f"{p.value.dtype} parameter")
    if arr.dtype != p.value.dtype:   # e.g. float64 1e39 would become float32 inf
        try:
            return cast_checked(arr, p.value.dtype, f"state {key!r}")
        except ValueError as e:
            raise StateDictError(str(e)) from None
    return arr


def _new_temp_file(folder):
    """(fd, path) of a new file in `folder`, created like open(path, "w") creates one:
    mode 0666 less the umask, as every other file graphc writes (tempfile.mkstemp's
    0600 would make saved weights unreadable to the user's group)."""
    import secrets
    while True:
        tmp = os.path.join(folder, f".graphc-{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def save_npz(path, arrays: dict) -> None:
    """Write `arrays` to exactly `path` (no '.npz' appended), atomically."""
    path = os.fspath(path)
    for k, v in arrays.items():
        if np.asarray(v).dtype == object:
            raise StateDictError(f"save: {k!r} is not a numeric array")
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = _new_temp_file(folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_npz(path) -> "OrderedDict[str, np.ndarray]":
    """Read every array of an .npz archive without ever unpickling."""
    path = os.fspath(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except zipfile.BadZipFile as e:        # e.g. truncated: no central directory
        raise StateDictError(f"{path}: not a readable .npz archive: the file is truncated "
                             f"or damaged ({e})") from None
    except (ValueError, OSError, EOFError) as e:
        raise StateDictError(f"{path}: not a readable .npz archive ({e})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise StateDictError(f"{path}: is a single .npy array, not an .npz archive of named "
                             "arrays")
    out = OrderedDict()
    with archive:
        for k in archive.files:
            try:
                out[k] = archive[k]
            except ValueError as e:
                if "pickle" in str(e) or "Object arrays" in str(e):
                    raise StateDictError(
                        f"{path}: entry {k!r} is a Python object array; refusing to load it "
                        "(loading would need pickle, which can execute code)") from None
                raise StateDictError(f"{path}: entry {k!r} is unreadable ({e})") from None
            except Exception as e:  # corrupt member (zip/CRC errors)
                raise StateDictError(f"{path}: entry {k!r} is unreadable ({e})") from None
    return out
