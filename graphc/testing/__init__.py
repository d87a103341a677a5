"""Testing tools shipped with graphc: the differential fuzzer (`python -m
graphc.testing.fuzz`), its graph generator and its independent float64 reference."""
