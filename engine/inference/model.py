"""A trained model ready to use: weights, configs, tokenizer, context length and image preprocessing,
from a self-describing model file (models/weights/model_file.py) alone, or from flags for other weights.

    from engine.inference.model import load_model
    m = load_model(run="logs/NAME")          # or load_model("logs/NAME/model_fp32.pt")

Flags given explicitly (model, text_model, vocab, context_length) must agree with the file's record;
a conflict is an error naming both. Without a record (a plain state dict, a Chinese-CLIP checkpoint,
an HF folder without flags reads its config.json and tokenizer) the flags say what the record would,
with the defaults of the tools.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from data.files import InputError, read_json_object
from data.images.transform import IMAGE_MEAN, IMAGE_STD

DEFAULT_VISION, DEFAULT_TEXT, DEFAULT_CONTEXT = "ViT-B-16", "RoBERTa-wwm-ext-base-chinese", 52


@dataclass
class LoadedModel:
    model: Any                       # models.CLIP in eval mode, fp32, on the CPU
    tokenizer: Any                   # None when no vocabulary is known (images only)
    context_length: int
    image: Dict[str, Any]            # resolution, mean, std, resize (None: not recorded)
    weights: Optional[Path] = None
    record: Optional[Dict[str, Any]] = field(default=None, repr=False)

    @property
    def resolution(self) -> int:
        return int(self.image["resolution"])

    @property
    def resize(self) -> Optional[str]:
        return self.image["resize"]


def add_model_flags(p, vocab_help: str = "tokenizer folder or vocab.txt (default: the one the model file "
                    "carries)", context_help: str = "text tokens incl. [CLS]/[SEP]") -> None:
    """The flags every tool that loads a trained model shares. Each defaults to None: the model file's
    record says what it is (an explicit flag must agree with it; see load_model)."""
    p.add_argument("--model", default=None, help="vision config name (models/configs) or JSON path "
                   f"(default: the model file's record, else {DEFAULT_VISION})")
    p.add_argument("--text-model", default=None, help="text config name or JSON path (default: the model "
                   f"file's record, else {DEFAULT_TEXT})")
    p.add_argument("--vocab", default=None, help=vocab_help)
    p.add_argument("--context-length", type=int, default=None,
                   help=f"{context_help} (default: the model file's, else {DEFAULT_CONTEXT})")


def _tokenizer_from_record(record: Dict[str, Any]):
    from data.tokenizer import load_tokenizer
    from models.weights.model_file import write_vocab

    with tempfile.TemporaryDirectory(prefix="clip-vocab-") as tmp:
        return load_tokenizer(write_vocab(record, tmp))  # BertTokenizer keeps the vocab in memory


def load_model(weights: Optional[str] = None, run: Optional[str] = None, model: Optional[str] = None,
               text_model: Optional[str] = None, vocab: Optional[str] = None,
               context_length: Optional[int] = None) -> LoadedModel:
    """See the module docstring. Raises InputError (one line) on a bad file or a conflict."""
    from data.tokenizer import load_tokenizer
    from models import CLIP, load_text_config, load_vision_config
    from models.weights import (check_architecture, clip_state_from_object, load_pretrained_clip,
                                load_weights_file, ours_from_hf_config, text_shape)
    from models.weights.model_file import check_flags, configs, resolve_weights, unwrap

    path = resolve_weights(weights, run)
    state = record = None
    if path is not None and not path.is_dir():
        obj = load_weights_file(path)
        state, record = unwrap(obj, path)
        if record is None:  # a plain state dict, a Chinese-CLIP checkpoint, {"module": ...}
            state, _ = clip_state_from_object(obj, path)
        del obj
    tokenizer = load_tokenizer(vocab) if vocab else None
    if record is not None:
        check_flags(record, path, model, text_model, vocab, context_length)
        vision, text = configs(record, source=str(path))
        context = int(record["context_length"])
        tokenizer = tokenizer or _tokenizer_from_record(record)
        image = dict(record["image"])
    elif path is not None and path.is_dir() and not (model or text_model):
        # A ChineseCLIPModel folder describes itself too: config.json, and its tokenizer when saved.
        vision, text = ours_from_hf_config(read_json_object(path / "config.json"), str(path))
        if tokenizer is None and (path / "vocab.txt").is_file():
            tokenizer = load_tokenizer(path)
        context = DEFAULT_CONTEXT if context_length is None else int(context_length)
        image = {"resolution": vision.image_resolution, "mean": list(IMAGE_MEAN), "std": list(IMAGE_STD),
                 "resize": "squash"}
    else:
        vision = load_vision_config(model or DEFAULT_VISION)
        if tokenizer is not None:
            vocab_size = len(tokenizer.get_vocab())
        elif state is not None and text_shape(state):  # images only: the weights say the vocab size
            vocab_size = text_shape(state)["vocab_size"]
        else:
            vocab_size = None
        text = load_text_config(text_model or DEFAULT_TEXT, vocab_size=vocab_size)
        context = DEFAULT_CONTEXT if context_length is None else int(context_length)
        image = {"resolution": vision.image_resolution, "mean": list(IMAGE_MEAN), "std": list(IMAGE_STD),
                 "resize": None}
    if context > text.max_position_embeddings:
        raise InputError(f"context length {context} exceeds the text model's max_position_embeddings "
                         f"{text.max_position_embeddings}")
    if context < 3:
        raise InputError(f"context length {context} is too short ([CLS], a token, [SEP])")
    clip = CLIP(vision, text)
    if state is not None and "logit_bias" in state:  # trained with the sigmoid loss
        clip.add_logit_bias()
    if path is not None:
        if path.is_dir():
            load_pretrained_clip(clip, path)
        else:
            check_architecture(state, clip.state_dict(), str(path))
            clip.load_state_dict(state, strict=True)
    return LoadedModel(clip.eval(), tokenizer, context, image, path, record)
