"""Text tower: transformers' BertModel (Chinese RoBERTa-wwm-ext uses BERT's architecture and names).

The CLIP text feature is the last hidden state of [CLS] (position 0) times `text_projection`, as in
Chinese-CLIP. BertModel is built without its pooler (unused, and it would receive no gradient) and with
PyTorch SDPA attention. Parameter names are those of the public RoBERTa release minus its `bert.` prefix.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from transformers import BertConfig, BertModel

from .fused import apex_available, swap_layer_norms

# BertConfig fields the architecture JSONs and RoBERTa folders may set; anything else is a typo or belongs
# to another model type (we refuse it rather than silently ignore it).
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings")
# Fields that change the computation; two configs agreeing on these describe the same network.
ARCH_FIELDS = _REQUIRED + ("type_vocab_size", "hidden_act", "layer_norm_eps")


def _known_fields() -> set:
    return set(BertConfig().to_dict())


def make_bert_config(fields: Mapping[str, Any], source: str = "text config", strict: bool = True) -> BertConfig:
    """BertConfig from a dict of BertConfig fields. strict: unknown keys raise (our JSONs); non-strict
    drops them (RoBERTa folders carry extras such as `directionality` or `pooler_fc_size`)."""
    fields = {k: v for k, v in fields.items() if not k.startswith("_")}  # "_comment" keys document JSONs
    missing = [k for k in _REQUIRED if k not in fields]
    if missing:
        raise ValueError(f"{source}: missing {', '.join(missing)}")
    known = _known_fields()
    unknown = sorted(set(fields) - known)
    if unknown and strict:
        raise ValueError(f"{source}: unknown BertConfig fields {unknown}")
    fields = {k: v for k, v in fields.items() if k in known and k not in ("architectures", "model_type",
                                                                           "transformers_version")}
    if fields["hidden_size"] % fields["num_attention_heads"]:
        raise ValueError(f"{source}: hidden_size {fields['hidden_size']} is not a multiple of "
                         f"num_attention_heads {fields['num_attention_heads']}")
    # No KV cache in an encoder; SDPA picks flash / memory-efficient kernels on GPUs.
    fields.update(use_cache=False, is_decoder=False, add_cross_attention=False)
    try:
        return BertConfig(**fields, attn_implementation="sdpa")
    except (TypeError, ValueError) as e:  # e.g. a string where a number belongs
        raise ValueError(f"{source}: {e}") from None


def arch_dict(config: BertConfig) -> dict:
    return {k: getattr(config, k) for k in ARCH_FIELDS}


def config_to_json_dict(config: BertConfig) -> dict:
    """The fields our text JSONs hold (architecture plus dropout/init settings)."""
    keys = ARCH_FIELDS + ("hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "pad_token_id")
    return {k: getattr(config, k) for k in keys}


def build_bert(config: BertConfig) -> BertModel:
    bert = BertModel(config, add_pooling_layer=False)
    if apex_available():
        swap_layer_norms(bert)
    return bert


def set_bert_checkpointing(bert: BertModel, enabled: bool) -> None:
    # transformers 5 renamed gradient_* to activation_* (the old names warn); support both.
    if enabled:
        kwargs = {"use_reentrant": False}
        if hasattr(bert, "activation_checkpointing_enable"):
            bert.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # pragma: no cover - transformers 4.x
            bert.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        if hasattr(bert, "activation_checkpointing_disable"):
            bert.activation_checkpointing_disable()
        else:  # pragma: no cover
            bert.gradient_checkpointing_disable()


def cls_hidden(bert: BertModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden state of the first ([CLS]) token: [B, hidden]."""
    out = bert(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
    return out.last_hidden_state[:, 0]
