"""sparsedge.kernels"""
