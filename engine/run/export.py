"""What a finished run hands on: the self-describing model file and, on request, a transformers folder.

Also the check at --init-from that the weights' image preprocessing matches the training store's.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from engine import dist
from engine.run import checkpoint
from models.weights import export_hf, read_clip_weights
from models.weights.model_file import make_record, unwrap

log = logging.getLogger(__name__)


def store_preprocessing(store) -> dict:
    """An ImageStore's image preprocessing, as a model record keeps it."""
    return {"resolution": store.resolution, "mean": list(store.mean), "std": list(store.std), "resize": store.resize}


def export_run(engine, cfg, store) -> Optional[Path]:
    """Write <run>/model_fp32.pt (weights + record: configs, vocab, context length, preprocessing) and
    with --export-hf <run>/hf, a ChineseCLIPModel folder with tokenizer and image processor. A
    collective (the fp32 weights are gathered from every rank); rank 0 writes."""
    module = engine.module
    record = make_record(module.vision_config, module.text_config, cfg.vocab, cfg.context_length,
                         store_preprocessing(store))
    out = checkpoint.export_fp32(engine, cfg.run_dir / "model_fp32.pt", record=record)
    if out:
        log.info("exported the consolidated fp32 weights and the model's record to %s", out)
        if cfg.export_hf:
            state, _ = read_clip_weights(out)
            report = export_hf(state, module.vision_config, module.text_config, cfg.run_dir / "hf",
                               vocab=cfg.vocab, resize=store.resize)
            log.info("%s", report)
    dist.barrier()
    return out


def warn_preprocessing(init_from: Optional[str], store) -> Optional[str]:
    """A warning (logged and returned) when --init-from weights were trained on images resized another
    way than the store's: Chinese-CLIP checkpoints and HF folders squash; our model files record it."""
    if not init_from:
        return None
    import torch

    path = Path(init_from)
    if path.is_dir():
        theirs, kind = "squash", "a ChineseCLIPModel folder (Chinese-CLIP's preprocessing)"
    else:
        try:  # memory-mapped: the weights were just loaded; only the keys and the record are read here
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001  (a legacy or safetensors file: nothing to say about it)
            return None
        if not isinstance(obj, dict):
            return None
        _, record = unwrap(obj, path)
        if record is not None:
            theirs, kind = record["image"]["resize"], "the model file's record"
        elif "state_dict" in obj or any(k.startswith("module.") for k in obj):
            theirs, kind = "squash", "a Chinese-CLIP checkpoint (Chinese-CLIP's preprocessing)"
        else:
            return None  # a plain state dict says nothing about its preprocessing
    if theirs == store.resize:
        return None
    msg = (f"--init-from {init_from} was trained on images resized by {theirs} ({kind}), but {store.path} was "
           f"built with {store.resize}: the weights will see differently shaped images; rebuild the store with "
           f"launch/build_lmdb.py --resize {theirs}")
    log.warning("%s", msg)
    return msg
