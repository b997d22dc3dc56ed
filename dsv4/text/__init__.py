"""Text in and out: the tokenizer and the V4 chat encoding.

    tokenizer.py  BPE tokenizers (tokenizer.json): train, load, the byte-level fallback
    chat.py       the V4 chat encoding and its streaming parser
"""
