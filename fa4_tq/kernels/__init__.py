"""CuTeDSL kernels on the packed cache, one module per architecture.

Importing this package needs the ``gpu`` extra (flash-attn-4, nvidia-cutlass-dsl); the rest of
fa4_tq does not.
"""
