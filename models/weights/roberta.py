"""A Chinese RoBERTa folder (config.json or bert_config.json, pytorch_model.bin or model.safetensors,
keys prefixed `bert.`) -> our text tower; MLM/NSP heads and pooler ignored."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..text import arch_dict, build_bert, make_bert_config
from .core import (_BUFFER_SUFFIXES, ConversionReport, PathLike, StateDict, WeightConversionError, _tensors_only,
                   check_keys, load_weights_file)
from .shapes import match_text_config

# --------------------------------------------------------------------------------------------------
# Chinese RoBERTa folder -> text tower
# --------------------------------------------------------------------------------------------------

def _read_folder_weights(folder: Path) -> StateDict:
    """model.safetensors / pytorch_model.bin, or their sharded forms (*.index.json)."""
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return _tensors_only(load_weights_file(folder / single), folder / single)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            state: StateDict = {}
            for shard in sorted(set(weight_map.values())):
                state.update(_tensors_only(load_weights_file(folder / shard), folder / shard))
            return state
    raise WeightConversionError(f"{folder}: no model.safetensors, pytorch_model.bin or sharded index found")


def _fix_legacy_names(key: str) -> str:
    # TF-converted BERT checkpoints name LayerNorm parameters gamma/beta.
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))


def read_roberta_config(folder: PathLike):
    folder = Path(folder)
    for name in ("config.json", "bert_config.json"):
        if (folder / name).is_file():
            try:
                fields = json.loads((folder / name).read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise WeightConversionError(f"{folder / name}:{e.lineno}: not valid JSON ({e.msg})") from None
            try:
                return make_bert_config(fields, source=str(folder / name), strict=False)
            except ValueError as e:
                raise WeightConversionError(str(e)) from None
    raise WeightConversionError(f"{folder}: no config.json or bert_config.json")


def convert_roberta(folder: PathLike):
    """Chinese RoBERTa-wwm-ext folder -> (`bert.*` state dict, BertConfig, report). The MLM/NSP heads
    (`cls.*`) and the pooler are dropped; every other tensor must map onto BertModel."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightConversionError(f"{folder}: not a directory (expected a RoBERTa folder with config.json "
                                    "or bert_config.json, vocab.txt and the weights)")
    config = read_roberta_config(folder)
    source = _read_folder_weights(folder)
    report = ConversionReport(f"RoBERTa folder {folder}", "text tower (bert.*)")
    if not (folder / "vocab.txt").is_file():
        report.notes.append("warning: no vocab.txt beside the weights (the tokenizer needs it)")
    out: StateDict = {}
    for key, value in source.items():
        name = _fix_legacy_names(key)
        if name.startswith("cls."):
            report.drop("pre-training heads (MLM/NSP)", key)
            continue
        if not name.startswith("bert."):
            name = "bert." + name  # a bare BertModel.save_pretrained folder has no prefix
        if name.startswith("bert.pooler."):
            report.drop("pooler (CLIP uses the [CLS] hidden state)", key)
        elif name.endswith(_BUFFER_SUFFIXES):
            report.drop("index buffers, not weights", key)
        else:
            out[name] = value
    with torch.device("meta"):
        expected = {"bert." + k: v.shape for k, v in build_bert(config).state_dict().items()}
    check_keys(out, expected, f"{folder}")
    report.mapped = len(out)
    name = match_text_config(config)
    report.notes.append(f"text: {name or 'no named config matches'} ({arch_dict(config)})")
    return out, config, report


def check_text_compatible(model_config, folder_config, source: str) -> None:
    """Same architecture apart from the vocabulary size (checked by shapes)? Heads and activation do not
    show in tensor shapes, so compare the config fields."""
    a, b = arch_dict(model_config), arch_dict(folder_config)
    diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    if diff:
        raise WeightConversionError(f"{source}: text config differs from the model's "
                                    f"(field: model vs file): {diff}")
