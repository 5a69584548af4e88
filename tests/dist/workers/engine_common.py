"""Shared by the engine's multi-process tests: a tiny real data set (synthetic MUGE files -> LMDB),
a rank worker's join and batches of that data set, and the command line of launch/train.py on it
with the tiny test models."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[3]
TRAIN = str(REPO / "launch" / "train.py")


def make_data(root: Path, train_images: int = 96, valid_images: int = 40, seed: int = 0) -> Dict[str, str]:
    """The synthetic generator's files and LMDB stores at 32 px (ViT-tiny-test's resolution)."""
    from data.images.build_store import build_store
    from data.synthetic import make_synthetic

    root = Path(root)
    if not (root / "lmdb" / "valid" / "data.mdb").is_file():
        make_synthetic(root, seed=seed, sizes={"train": train_images, "valid": valid_images, "test": 4},
                       image_size=32, workers=1, progress=False)
        for split in ("train", "valid"):
            build_store(root / f"{split}_imgs.tsv", root / "lmdb" / split, 32, workers=1, progress=False)
    return {"train_data": str(root / "train_queries.jsonl"), "train_img": str(root / "lmdb" / "train"),
            "val_data": str(root / "valid_queries.jsonl"), "val_img": str(root / "lmdb" / "valid"),
            "vocab": str(root / "vocab.txt")}


def join_two_ranks() -> int:
    """A rank worker joins its group through DeepSpeed (as the trainer does); returns its rank."""
    from engine import dist

    dist.init_distributed(use_deepspeed=True, always=True, timeout_s=60)
    assert dist.world_size() == 2, "this worker expects 2 ranks"
    return dist.rank()


def open_test_pairs(data_dir):
    """(tokenizer, image store, training pairs at context 16) of make_data's data set."""
    from data.images.datasets import PairDataset
    from data.images.store import ImageStore
    from data.queries import read_queries, training_pairs
    from data.tokenizer import load_tokenizer

    data = Path(data_dir)
    store, tok = ImageStore(data / "lmdb" / "train"), load_tokenizer(data / "vocab.txt")
    return tok, store, PairDataset(training_pairs(read_queries(data / "train_queries.jsonl")), store, tok, 16)


def stack_rows(rows, store):
    """(normalised pixels, input ids) of data set rows, as one batch."""
    import torch

    from data.images.transform import normalize_uint8

    return (normalize_uint8(torch.stack([b["image"] for b in rows]), store.mean, store.std),
            torch.stack([b["input_ids"] for b in rows]))


def write_ds(path: Path, stage: int = 0, micro: int = 8, gas: int = 1, precision: str = "fp32",
             clip: float = 1.0, **extra) -> str:
    # overlap_comm off as in the shipped CPU configs (no streams to overlap on a CPU; DeepSpeed turns
    # it on by default at stage 3)
    cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
           "gradient_clipping": clip, "zero_optimization": {"stage": stage, "overlap_comm": False},
           "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    cfg.update(extra)
    Path(path).write_text(json.dumps(cfg, indent=1))
    return str(path)


def train_argv(data: Dict[str, str], ds: str, logs: Path, name: str, extra: Optional[List[str]] = None,
               val: bool = False) -> List[str]:
    argv = [TRAIN, "--deepspeed_config", ds, "--train-data", data["train_data"], "--train-img", data["train_img"],
            "--vocab", data["vocab"], "--model", "ViT-tiny-test", "--text-model", "BERT-tiny-test",
            "--logs", str(logs), "--name", name, "--num-workers", "0", "--lr", "2e-3", "--warmup", "2",
            "--log-every-steps", "1", "--dist-timeout", "60"]
    if val:
        argv += ["--val-data", data["val_data"], "--val-img", data["val_img"]]
    return argv + list(extra or [])
