"""NumPy interpreter backend (the reference)."""
from .interpreter import build, run

NEEDS_CONCRETE_SHAPES = True  # Function specializes symbolic dims for every backend
