"""gemma-export: Gemma from PyTorch to ONNX Runtime, with parity proved.

The package is split so that a deployment needs no torch:
    gemma_export.models    PyTorch Gemma 1/2/3 and checkpoint loaders   (torch)
    gemma_export.exporter  trace to ONNX, quantize, verify, artifacts     (torch)
    gemma_export.runtime   ONNX Runtime session, tokenizer, generation    (no torch)
"""

__version__ = "0.1.0"
