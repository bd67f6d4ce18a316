"""Torch-free inference pipeline over an engine directory.

Import name ``ppllava.runtime``. Never imports torch or the PyTorch reference; each backend imports
its own library lazily, so a device with only onnxruntime (or only TensorRT) needs nothing else.
"""
