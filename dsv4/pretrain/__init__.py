"""Pretraining: the training loop, its data, optimizers and parallelism.

    train.py      TrainConfig, train(): the loop, checkpoints, resume, FSDP2
    data.py       corpora, the token store, packed batches
    optim.py      Muon and AdamW as the paper uses them
    parallel.py   expert parallelism
    cli.py        `dsv4 train`
"""
