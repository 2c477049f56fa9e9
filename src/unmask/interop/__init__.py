"""Published checkpoints in and out: LLaMA/Qwen2/Mistral/LLaDA/Dream folders to run folders and back."""

from unmask.interop.hf_export import export_run
from unmask.interop.hf_import import Conversion, import_checkpoint, load_pretrained

__all__ = ["Conversion", "export_run", "import_checkpoint", "load_pretrained"]
