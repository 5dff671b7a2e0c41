"""sparsedge.loaders"""
