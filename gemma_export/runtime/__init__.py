"""Running an artifact on ONNX Runtime, with no torch: the session and its KV cache, generation,
the tokenizer, and the bench."""
