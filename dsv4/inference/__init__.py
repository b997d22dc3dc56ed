"""Inference: the KV cache and the engine that generates with it.

    cache.py      the compressed KV cache (SWA, CSA, HCA layers), optionally FP8
    engine.py     Engine, SamplingParams: batched decoding, MTP speculation, streaming text
    cli.py        `dsv4 generate` and `dsv4 chat`
"""
