"""PPLLaVA: export a video-LLM checkpoint into fast engines and answer questions about videos.

Importing this package is cheap and does not import torch: ``ppllava.runtime`` lives under this
namespace and must stay torch-free. The PyTorch reference model is loaded lazily on first use of
``ppllava.PPLLaVA``.
"""

__version__ = "0.1.0"

__all__ = ["PPLLaVA", "PPLLaVAConfig", "__version__"]


def __getattr__(name):
    if name == "PPLLaVA":
        from ppllava.model import PPLLaVA

        return PPLLaVA
    if name == "PPLLaVAConfig":
        from ppllava.config import PPLLaVAConfig

        return PPLLaVAConfig
    raise AttributeError(f"module 'ppllava' has no attribute {name!r}")
