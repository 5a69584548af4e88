"""A trained model ready to use: weights, configs, tokenizer, context length and image preprocessing,
named the way every tool names a model (engine/inference/source.py): a self-describing model file
(models/weights/model_file.py) or a run dir alone, or flags for other weights.

    from engine.inference.model import load_model
    m = load_model(run="logs/NAME")          # or load_model("logs/NAME/model_fp32.pt")

Flags given explicitly (model, text_model, vocab, context_length) must agree with the file's record;
a conflict is an error naming both. Without a record (a plain state dict, a Chinese-CLIP checkpoint;
an HF folder reads its config.json and tokenizer) the flags say what the record would, with the
defaults of the tools.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from engine.inference.naming import DEFAULT_CONTEXT, DEFAULT_TEXT, DEFAULT_VISION


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
                    "carries)", context_help: str = "text tokens incl. [CLS]/[SEP]",
                    weights_help: Optional[str] = None) -> None:
    """The flags every tool that loads a trained model shares. Each defaults to None: the model file's
    record says what it is (an explicit flag must agree with it; see load_model). With weights_help,
    also --weights FILE and --run DIR, the two ways to name the model."""
    if weights_help:
        p.add_argument("--weights", default=None, help=weights_help)
        p.add_argument("--run", default=None, help="a run dir of launch/train.py --export: its model_fp32.pt, "
                       "which records configs, vocab, context length and preprocessing")
    p.add_argument("--model", default=None, help="vision config name (models/configs) or JSON path "
                   f"(default: the model file's record, else {DEFAULT_VISION})")
    p.add_argument("--text-model", default=None, help="text config name or JSON path (default: the model "
                   f"file's record, else {DEFAULT_TEXT})")
    p.add_argument("--vocab", default=None, help=vocab_help)
    p.add_argument("--context-length", type=int, default=None,
                   help=f"{context_help} (default: the model file's, else {DEFAULT_CONTEXT})")


def load_model(weights: Optional[str] = None, run: Optional[str] = None, model: Optional[str] = None,
               text_model: Optional[str] = None, vocab: Optional[str] = None,
               context_length: Optional[int] = None, need_weights: bool = False) -> LoadedModel:
    """See the module docstring. need_weights: refuse to build a model with random weights when no
    weights are named. Raises InputError (one line) on a bad file or a conflict."""
    # Here, not at the top: source.py imports torch and transformers, and the tools' --help reads this module.
    from engine.inference.source import open_model
    from models import CLIP

    src = open_model(weights, run, model, text_model, vocab, context_length, need_weights=need_weights)
    clip = CLIP(src.vision, src.text)
    if src.state is not None:
        clip.add_logit_bias_if_in(src.state)
        clip.load_state_dict(src.state, strict=True)  # open_model checked every key and shape
    return LoadedModel(clip.eval(), src.tokenizer, src.context_length, src.image, src.path, src.record)
