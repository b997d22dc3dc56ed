"""The model: its configuration and the network, with the numerics they build on.

    config.py     ModelConfig, the presets, config.json in every layout dsv4 reads
    network.py    the V4 network (Transformer): attention, mHC, MoE, MTP
    numerics.py   FP8 / FP4 rounding and the Hadamard transform, in plain PyTorch
    quant.py      the FP8 / FP4 block-scaled weight formats and the layers that keep them
    costs.py      analytic parameters, KV-cache bytes and FLOPs (no network built)
"""


def __getattr__(name: str):
    # `from dsv4.model import Transformer`: the network (and torch) only when asked for, so
    # `dsv4.model.config` stays light.
    if name == "Transformer":
        from dsv4.model.network import Transformer

        return Transformer
    raise AttributeError(name)
