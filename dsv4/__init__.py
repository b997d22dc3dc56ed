"""dsv4: DeepSeek-V4, end to end, in readable PyTorch."""

from dsv4.config import ModelConfig

__all__ = ["ModelConfig", "Transformer"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The network is imported lazily so that `dsv4 info` and config tooling stay light.
    if name == "Transformer":
        from dsv4.model import Transformer

        return Transformer
    raise AttributeError(name)
