"""A tiny split for extraction tests: a real LMDB (data's writer), MUGE queries, a vocab and the
weights of a seeded tiny CLIP (ViT-tiny-test + BERT-tiny-test)."""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

VISION, TEXT = "ViT-tiny-test", "BERT-tiny-test"


def build_tiny_split(root: Path, n_images: int = 45, n_queries: int = 23, seed: int = 0) -> dict:
    from data.images.store import ImageStoreWriter
    from data.synthetic import caption, vocab_tokens
    from models import build_clip

    root = Path(root)
    rng = np.random.default_rng(seed)
    image_ids = sorted(rng.choice(10_000, n_images, replace=False).tolist())
    # Smooth-ish random images so features differ; a few duplicates give exact feature ties.
    with ImageStoreWriter(root / "lmdb", resolution=32, source="test") as w:
        pixels = {i: rng.integers(0, 256, (3, 32, 32), dtype=np.uint8) for i in image_ids}
        pixels[image_ids[-1]] = pixels[image_ids[0]]
        w.put_many(pixels.items())
        w.finish()
    with open(root / "queries.jsonl", "w", encoding="utf-8") as f:
        for q in range(n_queries):
            items = rng.choice(image_ids, int(rng.integers(1, 4)), replace=False).tolist()
            f.write(json.dumps({"query_id": 700 + q, "query_text": caption(int(rng.integers(432)), q % 3),
                                "item_ids": items}, ensure_ascii=False) + "\n")
    tokens = vocab_tokens()
    (root / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    torch.manual_seed(seed)
    model = build_clip(VISION, TEXT, vocab_size=len(tokens))
    torch.save(model.state_dict(), root / "weights.pt")
    return {"lmdb": root / "lmdb", "queries": root / "queries.jsonl", "vocab": root / "vocab.txt",
            "weights": root / "weights.pt", "vocab_size": len(tokens)}


def load_tiny_model(root: Path):
    from models import build_clip

    root = Path(root)
    n = sum(1 for line in (root / "vocab.txt").read_text(encoding="utf-8").splitlines() if line)
    model = build_clip(VISION, TEXT, vocab_size=n)
    model.load_state_dict(torch.load(root / "weights.pt", weights_only=True))
    return model


SQUASH_32 = {"resolution": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "resize": "squash"}


def save_tiny_model_file(d: dict, path: Path, context: int = 24, image: dict = SQUASH_32) -> dict:
    """build_tiny_split's weights as our model file (the record train.py --export writes) at `path`;
    returns the state dict."""
    from models import build_clip
    from models.weights.model_file import make_record, save_model_file

    state = torch.load(d["weights"], weights_only=True)
    model = build_clip(VISION, TEXT, vocab_size=d["vocab_size"])
    save_model_file(state, make_record(model.vision_config, model.text_config, d["vocab"], context, image), path)
    return state
