"""`dsv4 eval`: perplexity, long-context retrieval, tasks and benchmark files."""
