"""From a loaded model to a verified artifact: trace, rewrite for ONNX Runtime, quantize or narrow,
verify, write atomically. Needs torch and onnx; the runtime never imports it."""
