"""Calibration sets built with the runtime's own preprocessing, and quantization of the stages.

Import name ``ppllava.calibration``. May import the reference and the runtime.
"""
