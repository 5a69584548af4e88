"""Images: the LMDB store of pre-transformed uint8 images (store.py), the evaluation transform and
normalisation (transform.py), JPEG encode/decode (jpeg.py), the image sources users have (sources.py:
MUGE tsv, image folders, Chinese-CLIP's LMDB), the store builder (build_store.py), and map-style
datasets over a store (datasets.py).

May import: data's ground floor (files, tokenizer, queries); nothing of data.built, engine or models.
"""
