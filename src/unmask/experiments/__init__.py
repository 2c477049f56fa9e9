"""SMDM's experiments as commands, built on the core (never imported by it).

    scaling        IsoFLOP scaling laws of MDM and AR and the compute multiplier between them
    reverse_curse  facts seen in one direction, asked in the other (synthetic fictional facts)
    conditional    fine-tuning on question/answer pairs and guided sampling, MDM vs AR
    shift          relative NLL increase on text unlike the training corpus

Each writes a results folder (results.json, results.md, a PNG) and resumes after interruption
(:mod:`unmask.experiments.runner`). The small model the last three train and the recipe of every
run live in :mod:`unmask.experiments.recipe`.
"""
