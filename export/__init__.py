"""Reference model -> ONNX / TensorRT / TensorRT-LLM, verified against the reference.

Import name ``ppllava.export``. May import the reference (``ppllava``) and the runtime.
"""
