"""The pieces of the one training loop (:mod:`unmask.train`), one concern each.

    optim.py     AdamW, the learning-rate schedule (warmup, cosine, steps changed on resume), precision
    data.py      the data an objective learns from: windows of a token folder, or pair rows
    restore.py   resuming: the checkpoint, the settings the run continues with, the state put back
    checks.py    the model fits the data and the objective
    step.py      one optimizer step over the global batch (random streams, batch layout)
    save.py      checkpoints and metrics lines
"""
