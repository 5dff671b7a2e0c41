"""sparsedge.bench"""
