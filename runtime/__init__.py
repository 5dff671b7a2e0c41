"""sparsedge.runtime: load a model file and run it (numpy + numba + scipy + cffi; never torch)."""
