"""sparsedge.formats"""
