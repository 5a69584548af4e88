"""How a tool names a model: the weights themselves, or the run that wrote them (--run DIR, or a run
dir where a path is asked for: its model_fp32.pt), and the names each tool gives those flags. What the
named model is, and loading it, is source.py's; this module stays light (no torch) because the tools'
argument parsers read it before --help answers."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from data.files import InputError

RUN_MODEL_FILE = "model_fp32.pt"  # what train.py --export writes into the run dir
DEFAULT_VISION, DEFAULT_TEXT, DEFAULT_CONTEXT = "ViT-B-16", "RoBERTa-wwm-ext-base-chinese", 52


@dataclass(frozen=True)
class Flags:
    """The names a tool gives the model flags, so that its messages name its own flags."""
    weights: str = "--weights"
    run: str = "--run"
    model: str = "--model"
    text_model: str = "--text-model"
    vocab: str = "--vocab"
    context_length: str = "--context-length"
    resize: str = "--resize"


CONVERT_FLAGS = Flags(weights="--input", model="--vision", text_model="--text")
TRAIN_FLAGS = Flags(weights="--init-from")


def model_path(weights: Optional[str] = None, run: Optional[str] = None, flags: Flags = Flags(),
               required: bool = False) -> Optional[Path]:
    """The weights a tool's flags name: the file or folder given, or the run's model_fp32.pt. A folder
    holding model_fp32.pt and no config.json is a run dir too. None when neither is given, unless
    `required`."""
    if weights and run:
        raise InputError(f"give {flags.weights} or {flags.run}, not both")
    if required and not (weights or run):
        raise InputError(f"which model? give {flags.weights} FILE or {flags.run} DIR")
    if run:
        path = Path(run) / RUN_MODEL_FILE
        if not path.is_file():
            raise InputError(f"{flags.run} {run}: no {RUN_MODEL_FILE} there (train with --export to write it)")
        return path
    if not weights:
        return None
    path = Path(weights)
    if not path.exists():
        raise InputError(f"{flags.weights} {weights}: no such file or directory")
    if path.is_dir() and not (path / "config.json").is_file():  # not a ChineseCLIPModel folder
        if (path / RUN_MODEL_FILE).is_file():
            return path / RUN_MODEL_FILE
        raise InputError(f"{flags.weights} {weights}: a folder with neither {RUN_MODEL_FILE} (a run of train.py "
                         f"--export) nor config.json (a ChineseCLIPModel folder)")
    return path
