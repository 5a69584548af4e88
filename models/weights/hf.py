"""A transformers ChineseCLIPModel folder (save_pretrained / from_pretrained) <-> our state dict, with
the tokenizer and an image processor that resizes as our image store did."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Tuple

import torch

from data.files import read_json_object

from ..config import vision_config_from_dict
from ..text import config_to_json_dict, make_bert_config
from ..vit import VisionConfig
from .core import (_BUFFER_SUFFIXES, ConversionReport, PathLike, StateDict, WeightConversionError, check_keys,
                   expected_shapes, summarize_keys)
from .shapes import match_text_config, match_vision_config
from .roberta import _fix_legacy_names, _read_folder_weights

# --------------------------------------------------------------------------------------------------
# transformers ChineseCLIPModel folders
# --------------------------------------------------------------------------------------------------

# Per-block renames, ours (visual.transformer.resblocks.N.) <-> HF (vision_model.encoder.layers.N.).
_HF_BLOCK = {
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_HF_VISION = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight", "ln_pre.bias": "pre_layrnorm.bias",  # sic: HF's spelling
    "ln_post.weight": "post_layernorm.weight", "ln_post.bias": "post_layernorm.bias",
}


def hf_config_from_ours(vision: VisionConfig, text):
    from transformers import ChineseCLIPConfig

    text_fields = config_to_json_dict(text)
    vision_fields = dict(hidden_size=vision.vision_width, intermediate_size=4 * vision.vision_width,
                         num_hidden_layers=vision.vision_layers, num_attention_heads=vision.vision_heads,
                         image_size=vision.image_resolution, patch_size=vision.vision_patch_size,
                         hidden_act=vision.act, layer_norm_eps=1e-5, projection_dim=vision.embed_dim)
    return ChineseCLIPConfig(text_config=text_fields, vision_config=vision_fields, projection_dim=vision.embed_dim)


def ours_from_hf_config(config: dict, source: str):
    """(VisionConfig, BertConfig) from a ChineseCLIPModel config.json dict."""
    if config.get("model_type") != "chinese_clip":
        raise WeightConversionError(f"{source}: model_type is {config.get('model_type')!r}, not 'chinese_clip'")
    from transformers import ChineseCLIPConfig

    try:
        cfg = ChineseCLIPConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise WeightConversionError(f"{source}: {e}") from None
    v, t = cfg.vision_config, cfg.text_config
    if v.intermediate_size != 4 * v.hidden_size:
        raise WeightConversionError(f"{source}: vision intermediate_size {v.intermediate_size} is not 4 x hidden "
                                    f"{v.hidden_size}; our ViT's MLP is fixed at 4x")
    if v.num_channels != 3 or abs(v.layer_norm_eps - 1e-5) > 1e-12:
        raise WeightConversionError(f"{source}: unsupported vision num_channels {v.num_channels} or "
                                    f"layer_norm_eps {v.layer_norm_eps}")
    image_size = v.image_size if isinstance(v.image_size, int) else v.image_size[0]
    patch = v.patch_size if isinstance(v.patch_size, int) else v.patch_size[0]
    try:
        vision = vision_config_from_dict(dict(
            embed_dim=cfg.projection_dim, image_resolution=image_size, vision_layers=v.num_hidden_layers,
            vision_width=v.hidden_size, vision_patch_size=patch, vision_heads=v.num_attention_heads,
            act=v.hidden_act), source=source)
    except ValueError as e:
        raise WeightConversionError(str(e)) from None
    text_fields = {k: getattr(t, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                   "num_attention_heads", "intermediate_size", "max_position_embeddings", "type_vocab_size",
                   "hidden_act", "layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob",
                   "initializer_range", "pad_token_id")}
    return vision, make_bert_config(text_fields, source=source)


def from_hf_state(state: Mapping[str, torch.Tensor], vision: VisionConfig, source: str
                  ) -> Tuple[StateDict, ConversionReport]:
    report = ConversionReport(source, "CLIP (ours)")
    src = {_fix_legacy_names(k): v for k, v in state.items()}
    out: StateDict = {}
    used, unmapped = set(), []

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return src[key]

    try:
        for ours, theirs in _HF_VISION.items():
            out["visual." + ours] = take("vision_model." + theirs)
        out["visual.proj"] = take("visual_projection.weight").t()
        for i in range(vision.vision_layers):
            hf, mine = f"vision_model.encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
            # HF keeps q/k/v separate; nn.MultiheadAttention's packed layout stacks them in q, k, v order.
            out[mine + "attn.in_proj_weight"] = torch.cat([take(hf + f"self_attn.{p}_proj.weight") for p in "qkv"])
            out[mine + "attn.in_proj_bias"] = torch.cat([take(hf + f"self_attn.{p}_proj.bias") for p in "qkv"])
            for ours, theirs in _HF_BLOCK.items():
                out[mine + ours] = take(hf + theirs)
        out["text_projection"] = take("text_projection.weight").t()
        out["logit_scale"] = take("logit_scale").reshape(1)
    except KeyError as e:
        raise WeightConversionError(f"{source}: missing {e.args[0]!r}") from None
    for key, value in src.items():
        if key in used:
            continue
        if key.startswith("text_model."):
            name = key[len("text_model."):]
            if name.startswith("pooler."):
                report.drop("text pooler, unused by CLIP", key)
            elif name.endswith(_BUFFER_SUFFIXES):
                report.drop("index buffers, not weights", key)
            else:
                out["bert." + name] = value
                used.add(key)
        elif key.endswith(_BUFFER_SUFFIXES):
            report.drop("index buffers, not weights", key)
        else:
            unmapped.append(key)
    if unmapped:
        raise WeightConversionError(f"{source}: {len(unmapped)} tensors with no counterpart in our model: "
                                    f"{summarize_keys(unmapped, limit=1000)}")
    out = {k: v.contiguous() for k, v in out.items()}
    report.mapped = len(used)
    return out, report


def to_hf_state(state: Mapping[str, torch.Tensor], vision: VisionConfig) -> StateDict:
    src = dict(state)
    out: StateDict = {}
    for ours, theirs in _HF_VISION.items():
        out["vision_model." + theirs] = src.pop("visual." + ours)
    out["visual_projection.weight"] = src.pop("visual.proj").t()
    for i in range(vision.vision_layers):
        hf, mine = f"vision_model.encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            q, k, v = src.pop(mine + f"attn.in_proj_{kind}").chunk(3, dim=0)
            out[hf + f"self_attn.q_proj.{kind}"], out[hf + f"self_attn.k_proj.{kind}"], \
                out[hf + f"self_attn.v_proj.{kind}"] = q, k, v
        for ours, theirs in _HF_BLOCK.items():
            out[hf + theirs] = src.pop(mine + ours)
    out["text_projection.weight"] = src.pop("text_projection").t()
    out["logit_scale"] = src.pop("logit_scale").reshape(())
    for key in [k for k in src if k.startswith("bert.")]:
        out["text_model." + key[len("bert."):]] = src.pop(key)
    if src:
        raise WeightConversionError(f"keys with no ChineseCLIPModel counterpart: {summarize_keys(src)}")
    return {k: v.detach().contiguous() for k, v in out.items()}


def convert_hf(folder: PathLike):
    """ChineseCLIPModel folder -> (our state dict, VisionConfig, BertConfig, report)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightConversionError(f"{folder}: no config.json (expected a ChineseCLIPModel folder)")
    config = read_json_object(config_path, error=WeightConversionError)
    vision, text = ours_from_hf_config(config, str(config_path))
    state, report = from_hf_state(_read_folder_weights(folder), vision, f"ChineseCLIPModel folder {folder}")
    check_keys(state, expected_shapes(vision, text), str(folder))
    report.notes.append(f"vision: {match_vision_config(vision) or 'no named config matches'}; "
                        f"text: {match_text_config(text) or 'no named config matches'}")
    return state, vision, text, report


def export_hf(state: Mapping[str, torch.Tensor], vision: VisionConfig, text, folder: PathLike,
              vocab: Optional[PathLike] = None, resize: str = "squash") -> ConversionReport:
    """Write a ChineseCLIPModel folder that `ChineseCLIPModel.from_pretrained` loads. With `vocab`
    (a vocab.txt or its folder) also write the tokenizer, and always an image processor for our
    resolution that resizes as the training store did (`resize`: squash or center-crop).
    The folder must not exist or be empty; it is written beside it and renamed into place."""
    from transformers import ChineseCLIPModel

    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise WeightConversionError(f"{folder}: exists and is not an empty directory")
    # The sigmoid loss's bias has no place in a ChineseCLIPModel; retrieval never uses it.
    state = {k: v for k, v in state.items() if k != "logit_bias"}
    check_keys(state, expected_shapes(vision, text), "state dict to export")
    hf_state = to_hf_state(state, vision)
    with torch.device("meta"):  # no random init of a second full model: the weights are assigned below
        hf = ChineseCLIPModel(hf_config_from_ours(vision, text))
    expected = hf.state_dict()
    check_keys(hf_state, {k: v.shape for k, v in expected.items()}, "ChineseCLIPModel")
    # Non-persistent index buffers stay on meta: save_pretrained writes persistent state only.
    hf.load_state_dict(hf_state, strict=True, assign=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=str(folder.parent)))
    try:
        hf.save_pretrained(tmp)
        _save_processors(tmp, vision, vocab, resize)
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = ConversionReport("CLIP (ours)", f"ChineseCLIPModel folder {folder}", mapped=len(hf_state))
    if vocab is None:
        report.notes.append("no --vocab given: the folder has no tokenizer files")
    return report


def _save_processors(folder: Path, vision: VisionConfig, vocab: Optional[PathLike], resize: str) -> None:
    from transformers import ChineseCLIPImageProcessor

    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    r = vision.image_resolution
    # squash: R×R directly (Chinese-CLIP's); center-crop: shorter side to R, then the centre R×R.
    size = {"height": r, "width": r} if resize == "squash" else {"shortest_edge": r}
    ChineseCLIPImageProcessor(size=size, crop_size={"height": r, "width": r}, do_center_crop=resize != "squash",
                              image_mean=mean, image_std=std).save_pretrained(folder)
    if vocab is not None:
        from transformers import BertTokenizer

        vocab = Path(vocab) / "vocab.txt" if Path(vocab).is_dir() else Path(vocab)
        tokenizer = BertTokenizer(vocab=str(vocab))
        if len(tokenizer) < 10:
            raise WeightConversionError(f"{vocab}: the vocabulary did not load ({len(tokenizer)} entries)")
        tokenizer.save_pretrained(folder)
        if not (folder / "vocab.txt").is_file():  # transformers 5 writes tokenizer.json only; our tools read vocab.txt
            shutil.copyfile(vocab, folder / "vocab.txt")
