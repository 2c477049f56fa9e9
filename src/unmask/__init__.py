"""unmask: masked diffusion language models, with an autoregressive baseline from the same code.

The five calls most users need::

    data = unmask.default_dataset()                                    # embedded corpus, tokenised
    unmask.train("runs/mdm", unmask.ModelConfig.from_name("tiny"), unmask.TrainConfig(steps=300), data)
    unmask.evaluate_checkpoint("runs/mdm")["perplexity"]               # ELBO bound (MDM) / exact (AR)
    unmask.generate("runs/mdm", prompt="ROMEO.", length=48)["samples"]
    model, config = unmask.load_model("runs/mdm")                      # a plain nn.Module
"""

from unmask.checkpoint import load_model
from unmask.config import ModelConfig, TrainConfig
from unmask.data import default_dataset
from unmask.errors import UnmaskError
from unmask.evaluation import evaluate_checkpoint
from unmask.generation import generate
from unmask.train import train

__version__ = "0.1.0"
__all__ = ["load_model", "ModelConfig", "TrainConfig", "default_dataset", "UnmaskError", "evaluate_checkpoint", "generate", "train"]
