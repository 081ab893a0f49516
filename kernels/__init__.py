"""Attention kernel paths for the joint EBAE/EBAR mask (installed as llara_dist.kernels)."""
