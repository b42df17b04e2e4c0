"""graftfx.kernels: Triton kernels, each beside a short fp32 PyTorch reference (``naive.py``).

Depends on torch and triton only. Each ``<op>/`` folder holds ``naive.py`` (the test oracle)
and the fused kernel file, which reads top to bottom: Triton kernels, launchers
``<op>_fwd``/``<op>_bwd``, the autograd wrapper / custom op, the public function.
"""
