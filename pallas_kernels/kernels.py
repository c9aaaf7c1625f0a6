"""Pallas kernels entry points (filled in by the kernels work; see api.py for the contract)."""


def quant_matmul(x, w, *, interpret, **kw):
    raise NotImplementedError("Pallas quant_matmul kernel not written yet")


def quant_grouped_matmul(x, w, group_sizes, *, interpret, **kw):
    raise NotImplementedError("Pallas quant_grouped_matmul kernel not written yet")
