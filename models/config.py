"""Architecture JSONs: `models/configs/<Name>.json`, or any path to a JSON file with the same fields.

A vision JSON holds VisionConfig's fields; a text JSON holds BertConfig fields. Keys starting with "_"
are comments.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Union

from transformers import BertConfig

from data.files import read_json_object

from .text import make_bert_config
from .vit import VisionConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def list_model_configs() -> Dict[str, List[str]]:
    """Named configs: {"vision": [...], "text": [...]} (a JSON is vision if it has `vision_width`)."""
    out: Dict[str, List[str]] = {"vision": [], "text": []}
    for path in sorted(CONFIG_DIR.glob("*.json")):
        kind = "vision" if "vision_width" in json.loads(path.read_text()) else "text"
        out[kind].append(path.stem)
    return out


def _resolve(name_or_path: Union[str, Path]) -> Path:
    named = CONFIG_DIR / f"{name_or_path}.json"
    if named.is_file():
        return named
    path = Path(name_or_path)
    if path.is_file():
        return path
    names = list_model_configs()
    raise ValueError(f"unknown model config {str(name_or_path)!r}: not a file and not one of "
                     f"{names['vision'] + names['text']}")


def _read_json(path: Path) -> dict:
    return read_json_object(path, error=ValueError)


def vision_config_from_dict(data: dict, source: str = "vision config") -> VisionConfig:
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    fields = set(VisionConfig.__dataclass_fields__)
    unknown, missing = sorted(set(data) - fields), sorted(fields - set(data) - {"act"})
    if unknown or missing:
        raise ValueError(f"{source}: " + "; ".join(
            s for s in (f"unknown fields {unknown}" if unknown else "",
                        f"missing fields {missing}" if missing else "") if s))
    try:
        return VisionConfig(**data)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def load_vision_config(name_or_path: Union[str, Path, VisionConfig]) -> VisionConfig:
    if isinstance(name_or_path, VisionConfig):
        return name_or_path
    path = _resolve(name_or_path)
    return vision_config_from_dict(_read_json(path), source=str(path))


def load_text_config(name_or_path: Union[str, Path, BertConfig], vocab_size: Optional[int] = None) -> BertConfig:
    if isinstance(name_or_path, BertConfig):
        fields = name_or_path.to_dict()
        source, strict = "text config", False
    else:
        path = _resolve(name_or_path)
        fields, source, strict = _read_json(path), str(path), True
    if vocab_size is not None:
        fields = dict(fields, vocab_size=int(vocab_size))
    return make_bert_config(fields, source=source, strict=strict)
