"""Zero-shot classification: top-1/top-5 accuracy of a CLIP on labelled images, from class names.

  python launch/zeroshot.py --run RUN --classes classes.txt --labels labels.jsonl \
      --image-lmdb LMDB [--templates templates.txt] --output zeroshot.json
  (or --image-feats FEATS: image features launch/extract.py wrote, instead of --image-lmdb)

The model: --run RUN (a run of train.py --export) or --weights RUN/model_fp32.pt, whose record brings
the configs, vocabulary and context length. Other weights (a Chinese-CLIP .pt, a plain state dict) need
--model, --text-model and --vocab (and --context-length, default 52); an HF ChineseCLIP folder reads
its config.json and vocab.txt. Flags given with a model file must agree with its record.

classes.txt: one class name per line. labels.jsonl: {"image_id": int, "label": "<class name>"} per
image; only labelled images are classified. Templates: built-in Chinese prompts ("一张{}的图片。",
...; engine/tools/zeroshot.py) or --templates FILE (one per line, "{}" for the class name), which
replaces them. The classifier: per class the mean of its prompts' normalised embeddings,
normalised. OUT: {"top1", "top5", "images", "classes", "per_class": {name: {images, top1, top5}},
"templates"} in percent.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.files import InputError, report_input_error  # noqa: E402
from engine.inference.model import add_model_flags  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p, weights_help="our model_fp32.pt, a Chinese-CLIP .pt or an HF folder (or --run)")
    p.add_argument("--classes", required=True, help="class names, one per line")
    p.add_argument("--labels", required=True, help='jsonl {"image_id": int, "label": class name}')
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image-lmdb", help="image store (launch/build_lmdb.py) holding the labelled images")
    src.add_argument("--image-feats", help="image features (.npz, folder of .npz, jsonl) of the labelled images")
    p.add_argument("--templates", default=None, help="prompt templates, one per line with {} (replaces the built-in)")
    p.add_argument("--output", required=True, help="result JSON")
    p.add_argument("--top-k", type=int, default=5, help="the second accuracy cut-off (default 5)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def image_features(a, model, image_ids, device):
    """[N, D] features of `image_ids`, in that order; InputError naming a missing id."""
    import numpy as np

    if a.image_feats:
        from engine.inference.feature_files import load_features

        ids, feats = load_features(a.image_feats)
        row = {int(i): r for r, i in enumerate(ids.tolist())}
        missing = [i for i in image_ids if i not in row]
        if missing:
            raise InputError(f"{a.image_feats}: no features for {len(missing)} labelled images, e.g. {missing[0]}")
        return np.asarray(feats, np.float32)[[row[i] for i in image_ids]]
    from data.images.store import ImageStore
    from engine.inference.extract import encode_images, eval_mode

    store = ImageStore(a.image_lmdb)
    have = set(store.ids())
    missing = [i for i in image_ids if i not in have]
    if missing:
        raise InputError(f"{a.image_lmdb}: {len(missing)} labelled images are not in the store, e.g. {missing[0]}")
    if store.resolution != model.image_resolution:
        raise InputError(f"--image-lmdb {a.image_lmdb} holds {store.resolution} px images, "
                         f"the model expects {model.image_resolution} px")
    with eval_mode(model):
        _, feats = encode_images(model, store, image_ids, a.batch_size, device, progress=not a.no_progress)
    return feats


def main(argv=None) -> int:
    a = parse_args(argv)
    import numpy as np
    import torch

    from data.files import atomic_write
    from engine.tools import zeroshot as zs
    from engine.inference.model import load_model

    try:
        t0 = time.perf_counter()
        device = torch.device(a.device)
        classes = zs.read_class_names(a.classes)
        templates = zs.read_templates(a.templates) if a.templates else zs.DEFAULT_TEMPLATES
        labels = zs.read_labels(a.labels, classes)
        loaded = load_model(a.weights, a.run, a.model, a.text_model, a.vocab, a.context_length, need_weights=True)
        if loaded.tokenizer is None:
            raise InputError(f"{loaded.weights} carries no vocabulary: give the one it was trained with, --vocab")
        model, tokenizer = loaded.model.to(device), loaded.tokenizer
        weights = zs.class_weights(model, tokenizer, classes, templates, loaded.context_length, device)
        image_ids = list(labels)
        feats = image_features(a, model, image_ids, device)
        top = zs.top_classes(feats, weights, min(a.top_k, len(classes)))
        result = zs.accuracy(top, np.asarray([labels[i] for i in image_ids]), classes)
        result["templates"] = templates
        with atomic_write(a.output) as f:
            json.dump(result, f, ensure_ascii=False, indent=1)
            f.write("\n")
        k = result["k"]
        print(f"zero-shot: top-1 {result['top1']:.2f}  top-{k} {result[f'top{k}']:.2f} over {result['images']} "
              f"images, {len(classes)} classes, {len(templates)} templates, in {time.perf_counter() - t0:.1f}s "
              f"-> {a.output}")
    except InputError as e:
        return report_input_error("zeroshot.py", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
