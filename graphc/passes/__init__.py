"""Graph optimizer passes (being written: see issue 4).  Identity for now."""


def optimize(graph, level=2):
    """Return (optimized graph, report entries)."""
    return graph, []
