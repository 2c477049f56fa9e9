import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs the files on one worker per core: each worker (and every command it starts in
    # a subprocess) computes on one thread, so the workers do not fight over the cores
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

from unmask.data import prepare_dataset, shakespeare_works, train_bpe


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A small prepared dataset: a 512-token BPE on a few Shakespeare works (fast to train on)."""
    works = shakespeare_works("train")[:6]
    val = shakespeare_works("validation")[:1]
    tok = train_bpe([text for _, text in works], vocab_size=512)
    out = tmp_path_factory.mktemp("data") / "small"
    return prepare_dataset(out, tok, [t for _, t in works], [t for _, t in val], progress=False)


@pytest.fixture
def generator_devices(monkeypatch):
    """Records the device every torch.Generator is created for: {id(generator): device type}.

    No GPU here: tests make a model report another device and check that each generator handed to
    a sampler was created for it (a CPU generator fails when the sampler draws on CUDA)."""
    import torch

    real, made = torch.Generator, {}

    def recording_generator(device="cpu"):
        g = real()
        made[id(g)] = torch.device(device).type
        return g

    monkeypatch.setattr(torch, "Generator", recording_generator)
    return made
