"""graphc.nn: modules (layers with parameters) that build graph nodes.

    from graphc import nn
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    logits = model(x)                       # x = gc.input("x", (None, 64))

See `module.py` for parameter discovery, train/eval modes, state dicts and
.npz save/load; `layers.py` for the layers; `init.py` for seeded initializers.
"""
from . import init
from .init import manual_seed
from .layers import *  # noqa: F401,F403
from .layers import __all__ as _layers_all
from .module import (Module, StateDictError, collect_state_updates, load_npz,  # noqa: F401
                     save_npz)

__all__ = ["Module", "StateDictError", "collect_state_updates", "init", "manual_seed",
           "load_npz", "save_npz"] + list(_layers_all)

from .rnn import GRU, LSTM, RNN  # noqa: E402  (recurrent layers, built on gc.scan)

__all__ += ["RNN", "LSTM", "GRU"]
