"""NumPy interpreter backend (the reference)."""
from .interpreter import build, run

NEEDS_CONCRETE_SHAPES = False
