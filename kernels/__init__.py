"""Triton kernels of dit_fast, installed as ``dit_fast.kernels``.

Each module holds the kernels of one op family and the Python launchers that size their grids;
registration as torch ops and autograd live in dit_fast.ops.triton_backend.
"""
