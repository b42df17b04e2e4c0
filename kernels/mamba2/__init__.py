"""Mamba-2 SSD chunked scan: Triton kernels (``ssd.py``) and fp32 references (``naive.py``)."""
from .naive import ssd_chunked, ssd_recurrent
from .ssd import ssd_bwd, ssd_fwd, ssd_scan

__all__ = ["ssd_scan", "ssd_fwd", "ssd_bwd", "ssd_chunked", "ssd_recurrent"]
