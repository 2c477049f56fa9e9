"""A masked diffusion model (MDM) exported by ``unmask export``, for ``transformers``.

``unmask export`` copies this file into an MDM's folder; ``transformers`` runs it only when asked
to (``AutoModel.from_pretrained(folder, trust_remote_code=True)``). Without that, the folder's
``model_type`` (``unmask_mdm``) is unknown to ``transformers``, so the network is never loaded
as a causal language model by mistake.

The network is LLaMA's, with the same tensor names, but attention is bidirectional: a position
attends to every real (non-padding) position, or, with ``sliding_window``, to those less than that
many positions away on either side. MASK (``mask_token_id``) is an input only: its logit is -inf.
With ``shift_logits`` (Dream) the logits of position i are those the network computes at
position i - 1. The logits equal unmask's own ``Transformer`` (fp32). An MDM fills masked positions
in parallel and does not generate left to right: ``generate()`` is refused.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


class UnmaskConfig(LlamaConfig):
    """LLaMA's configuration plus ``mask_token_id``, ``shift_logits`` and ``sliding_window``."""

    model_type = "unmask_mdm"


class UnmaskForMaskedDiffusion(LlamaForCausalLM):
    """``forward(input_ids, attention_mask=None)`` -> logits (B, L, vocab) for every position."""

    config_class = UnmaskConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.self_attn.is_causal = False

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        """``attention_mask`` (B, L): 1 at real tokens, 0 at padding, which no query attends to."""
        if labels is not None:
            raise ValueError("an MDM is trained on masked positions, not next-token labels; compute the loss from the logits")
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        device = input_ids.device if input_ids is not None else inputs_embeds.device
        bias = self.attention_bias(shape[0], shape[1], attention_mask, device)
        out = super().forward(input_ids=input_ids, attention_mask=bias, inputs_embeds=inputs_embeds, use_cache=False, **kwargs)
        logits = out.logits
        if getattr(self.config, "shift_logits", False):
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        mask_id = torch.tensor([self.config.mask_token_id], device=logits.device)
        out.logits = logits.index_fill(-1, mask_id, float("-inf"))
        return out

    def attention_bias(self, batch, length, attention_mask, device):
        """(B, 1, L, L) additive mask: 0 where a query may attend to a key, the dtype's minimum elsewhere."""
        i = torch.arange(length, device=device)
        keys = torch.ones(batch, length, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        allowed = keys[:, None, None, :] | (i[:, None] == i[None, :])  # a padding query still sees itself
        window = getattr(self.config, "sliding_window", None)
        if window:
            allowed = allowed & ((i[:, None] - i[None, :]).abs() < window)
        return torch.zeros(allowed.shape, dtype=self.dtype, device=device).masked_fill(~allowed, torch.finfo(self.dtype).min)

    def generate(self, *args, **kwargs):
        raise NotImplementedError(
            "a masked diffusion model fills masked positions in parallel and does not generate left to right: "
            "`unmask import` this folder and use `unmask sample`, or run a diffusion sampler on forward()'s logits"
        )
