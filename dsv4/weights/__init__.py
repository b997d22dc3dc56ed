"""Weights on disk: checkpoints in the native, official DeepSeek and transformers layouts.

    checkpoint.py  save / load / describe / convert, run directories
    convert.py     tensor names and layouts between the three formats
    cli.py         `dsv4 info` and `dsv4 convert`
"""
