"""dsv4: DeepSeek-V4, end to end, in readable PyTorch."""

from dsv4.errors import Error
from dsv4.model.config import ModelConfig

__all__ = ["Error", "ModelConfig", "Transformer", "load", "save"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The network and the checkpoint code are imported lazily so that `import dsv4`,
    # `dsv4 info` and config tooling stay light (no torch import).
    if name == "Transformer":
        from dsv4.model.network import Transformer

        return Transformer
    if name in ("load", "save"):
        from dsv4.weights import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(name)
