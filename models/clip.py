"""The dual encoder. Attribute (and so state-dict) names follow Chinese-CLIP: `visual` (OpenAI ViT layout),
`bert` (BertModel without pooler), `text_projection` [text_hidden, embed_dim], `logit_scale`; and `logit_bias`
[1] only in a model trained with the sigmoid loss (models.sigmoid_loss)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F
from transformers import BertConfig

from .config import load_text_config, load_vision_config
from .sigmoid_loss import SIGMOID_LOGIT_BIAS_INIT, SIGMOID_LOGIT_SCALE_INIT
from .text import build_bert, cls_hidden, set_bert_checkpointing
from .vit import VisionConfig, VisionTransformer

# CLIP's temperature: logits = exp(logit_scale) * cosine, starting at 1/0.07 and never above 100.
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = 100.0
PAD_ID = 0


class CLIP(nn.Module):
    def __init__(self, vision: VisionConfig, text: BertConfig, grad_checkpointing: bool = False):
        super().__init__()
        self.vision_config = vision
        self.visual = VisionTransformer(vision)
        self.bert = build_bert(text)
        self.text_projection = nn.Parameter(torch.empty(text.hidden_size, vision.embed_dim))
        nn.init.normal_(self.text_projection, std=text.hidden_size ** -0.5)
        # Shape [1], not a 0-dim scalar: DeepSpeed 0.19.8 cannot flatten 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.full([1], LOGIT_SCALE_INIT))
        self.register_parameter("logit_bias", None)  # add_logit_bias(): the sigmoid loss's bias
        self.set_grad_checkpointing(grad_checkpointing)

    @property
    def text_config(self) -> BertConfig:
        return self.bert.config

    @property
    def embed_dim(self) -> int:
        return self.vision_config.embed_dim

    @property
    def image_resolution(self) -> int:
        return self.vision_config.image_resolution

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each transformer block's activations in backward (both towers)."""
        self.visual.set_grad_checkpointing(enabled)
        set_bert_checkpointing(self.bert, enabled)

    def add_logit_bias(self, value: float = SIGMOID_LOGIT_BIAS_INIT) -> None:
        """Give the model the sigmoid loss's learnable bias (shape [1], state-dict key `logit_bias`)."""
        self.logit_bias = nn.Parameter(torch.full([1], float(value), device=self.logit_scale.device))

    def add_logit_bias_if_in(self, state) -> None:
        """Weights trained with the sigmoid loss carry its bias: add the parameter they load into (the
        training recipe then keeps or drops it)."""
        if "logit_bias" in state and self.logit_bias is None:
            self.add_logit_bias()

    def start_sigmoid_logits(self) -> None:
        """SigLIP's starting point for its logits: a bias of -10 and a scale of 10 (a softmax-trained
        temperature, often 100, with that bias would call every pair a match at first)."""
        self.add_logit_bias()
        with torch.no_grad():
            self.logit_scale.fill_(SIGMOID_LOGIT_SCALE_INIT)

    def drop_logit_bias(self) -> None:
        self.logit_bias = None

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """pixels: float [B, 3, R, R], already normalised with the image mean/std -> [B, embed_dim]."""
        feats = self.visual(pixels)
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                    normalize: bool = True) -> torch.Tensor:
        """input_ids: long [B, L] starting with [CLS], padded with 0 -> [B, embed_dim]."""
        if attention_mask is None:
            attention_mask = input_ids.ne(PAD_ID)
        hidden = cls_hidden(self.bert, input_ids, attention_mask.long())
        feats = hidden @ self.text_projection.to(hidden.dtype)
        return F.normalize(feats, dim=-1) if normalize else feats

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped to at most 100; shape [1]."""
        return self.logit_scale.exp().clamp(max=LOGIT_SCALE_MAX)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        out = {
            "image_features": self.encode_image(images),
            "text_features": self.encode_text(input_ids, attention_mask),
            "logit_scale": self.scale(),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out


def build_clip(vision: Union[str, Path, VisionConfig] = "ViT-B-16",
               text: Union[str, Path, BertConfig] = "RoBERTa-wwm-ext-base-chinese",
               grad_checkpointing: bool = False, vocab_size: Optional[int] = None,
               patch_dropout: float = 0.0) -> CLIP:
    """Build a randomly initialised CLIP from config names (models/configs/) or JSON paths.
    vocab_size overrides the text config's (a tokenizer with a smaller vocabulary); patch_dropout is
    the fraction of image patches dropped in training mode (models.vit.drop_patches)."""
    model = CLIP(load_vision_config(vision), load_text_config(text, vocab_size=vocab_size),
                 grad_checkpointing=grad_checkpointing)
    model.visual.patch_dropout = float(patch_dropout)
    return model
