"""sparsedge.runtime.ops"""
