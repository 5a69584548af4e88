"""Zero-shot image classification with a trained CLIP: class names -> prompts -> a linear classifier.

Each class's weight is the mean of its prompts' L2-normalised text embeddings, L2-normalised again
(CLIP's prompt ensembling); an image's class scores are the cosines with these weights, ranked
with the retrieval engine's rule (score, then the lower class index). Accuracy counts an image as
right at k when its label is among its k best classes.

Files: class names, one per line (UTF-8); templates, one per line, each with one "{}" where the
class name goes; labels, jsonl {"image_id": int, "label": "<a class name>"} per image.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from data.files import InputError, read_jsonl
from data.tokenizer import tokenize
from engine.retrieval.search import canonical_topk

# Our own Chinese prompts in the spirit of CLIP's ImageNet prompts: photo, picture, drawing, ...
DEFAULT_TEMPLATES = [
    "{}", "一张{}的图片。", "一张{}的照片。", "{}的照片", "这是一张{}的图片。", "图片里有{}。",
    "一幅{}的画。", "一张清晰的{}的照片。", "一张模糊的{}的照片。", "一张小小的{}的图片。",
    "一张{}的特写照片。", "我拍的{}。", "一个{}。", "{}的图案",
]


def _lines(path, what: str) -> List[str]:
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read().splitlines()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    out = []
    for lineno, line in enumerate(raw, start=1):
        line = line.strip()
        if line:
            out.append((lineno, line))
    if not out:
        raise InputError(f"{path}: no {what} in the file")
    return out


def read_class_names(path) -> List[str]:
    names: Dict[str, int] = {}
    for lineno, name in _lines(path, "class names"):
        if name in names:
            raise InputError(f"{path}:{lineno}: class {name!r} repeats line {names[name]}")
        names[name] = lineno
    return list(names)


def read_templates(path) -> List[str]:
    out = []
    for lineno, t in _lines(path, "templates"):
        if t.count("{}") != 1 or t.replace("{}", "").count("{") or t.replace("{}", "").count("}"):
            raise InputError(f"{path}:{lineno}: a template needs exactly one {{}} for the class name "
                             f"and no other braces, got {t!r}")
        out.append(t)
    return out


def read_labels(path, classes: Sequence[str]) -> Dict[int, int]:
    """{image id: class index}, in file order."""
    index = {c: i for i, c in enumerate(classes)}
    labels: Dict[int, int] = {}
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        image, label = obj.get("image_id"), obj.get("label")
        if not isinstance(image, int) or isinstance(image, bool):
            raise InputError(f"{where}: 'image_id' must be an integer, got {image!r}")
        if label not in index:
            raise InputError(f"{where}: label {label!r} of image {image} is not in the class names")
        if image in labels:
            raise InputError(f"{where}: image {image} is labelled twice")
        labels[image] = index[label]
    if not labels:
        raise InputError(f"{path}: no labelled images")
    return labels


@torch.no_grad()
def class_weights(model, tokenizer, classes: Sequence[str], templates: Sequence[str], context_length: int,
                  device: torch.device, batch_size: int = 256) -> np.ndarray:
    """[C, D] float32: per class the mean of its normalised prompt embeddings, normalised."""
    prompts = [t.format(c) for c in classes for t in templates]
    feats = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenize(tokenizer, prompts[start:start + batch_size], context_length).to(device)
        feats.append(model.encode_text(tokens).float().cpu())
    per_prompt = F.normalize(torch.cat(feats), dim=-1).view(len(classes), len(templates), -1)
    return F.normalize(per_prompt.mean(1), dim=-1).numpy()


def top_classes(image_feats: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
    """[N, k] class indices, best first; ties to the lower class index (the retrieval rule)."""
    scores = torch.from_numpy(np.asarray(image_feats, np.float32) @ np.asarray(weights, np.float32).T)
    return canonical_topk(scores, k)[1].numpy()


def accuracy(top: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> Dict:
    """Top-1 and top-k accuracy in percent, overall and per class (classes without images are
    listed with images 0 and null accuracies)."""
    hit1 = top[:, 0] == labels
    hitk = (top == labels[:, None]).any(1)
    k = top.shape[1]
    per_class = {}
    for i, name in enumerate(classes):
        mine = labels == i
        n = int(mine.sum())
        per_class[name] = {"images": n, "top1": 100.0 * hit1[mine].mean() if n else None,
                           f"top{k}": 100.0 * hitk[mine].mean() if n else None}
    return {"images": int(len(labels)), "classes": len(classes), "k": k, "top1": 100.0 * hit1.mean(),
            f"top{k}": 100.0 * hitk.mean(), "per_class": per_class}
