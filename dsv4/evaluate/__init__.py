"""`dsv4 eval`: perplexity, long-context retrieval, tasks and benchmark files.

    run.py        evaluate(backend, suite, out_dir, EvalOptions(...)): items -> results.json
    backends.py   LocalBackend (a dsv4 model through the KV cache); what a suite asks of a model
    endpoint.py   EndpointBackend: any OpenAI-compatible server (openai client, retries)
    ppl.py        perplexity / bits-per-byte, sliding window over the compressed cache
    niah.py       needle in a haystack + the CSA indexer's recall of the needle
    tasks.py      the post-training domains (dsv4.tasks)
    mc.py         multiple choice (MMLU, letter columns, ARC)
    math_answers.py  final-answer math (GSM8K, MATH)
    formats.py    benchmark files (JSONL, JSON, CSV, Parquet) with file:line errors
    store.py      resumable per-item results (items.jsonl)
    report.py     the table and the PNGs
    cli.py        the `dsv4 eval` command
"""
