"""The public path of the engine: `from dsv4.engine import Engine, SamplingParams`.

The code is in dsv4.inference.engine; this package only re-exports its public names.
"""

from dsv4.inference.engine import Engine, SamplingParams

__all__ = ["Engine", "SamplingParams"]
