"""Weight formats in and out of our CLIP state dict.

Our state dict ("ours"): `visual.*` (OpenAI ViT layout), `bert.*` (BertModel without pooler),
`text_projection` [text_hidden, embed_dim], `logit_scale` [1]. Formats:

- OpenAI's TorchScript checkpoint (ViT-B-16.pt as distributed) -> `visual.*` + `logit_scale`. Only
  `convert_openai` calls torch.jit.load, which executes code stored in the file; everything else loads
  with weights_only=True.
- A Chinese RoBERTa folder (config.json or bert_config.json, pytorch_model.bin or model.safetensors,
  keys prefixed `bert.`) -> `bert.*`; MLM/NSP heads and pooler ignored.
- Chinese-CLIP checkpoints ({"epoch", "step", "name", "state_dict"}, keys prefixed `module.`, 0-dim
  logit_scale) <-> ours.
- A transformers ChineseCLIPModel folder (save_pretrained / from_pretrained) <-> ours.

Every conversion returns a ConversionReport (what was mapped, what was dropped and why) and raises
WeightConversionError, listing keys, on unmapped, missing or wrongly shaped tensors.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from data.files import InputError, atomic_path, atomic_write, read_json_object

from .config import list_model_configs, load_text_config, load_vision_config, vision_config_from_dict
from .text import arch_dict, config_to_json_dict, make_bert_config
from .vit import VisionConfig

PathLike = Union[str, os.PathLike]
StateDict = Dict[str, torch.Tensor]

# Buffers some writers save and that carry no weights (transformers' position/token-type id ranges).
_BUFFER_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")


class WeightConversionError(InputError):
    """A weight file does not match the expected layout; the message lists the offending keys."""


class VocabMismatchError(WeightConversionError):
    """The weights fit the model except for the text vocabulary's size (the tokenizer's)."""


# --------------------------------------------------------------------------------------------------
# Reports and key checks
# --------------------------------------------------------------------------------------------------

def summarize_keys(keys: Iterable[str], limit: int = 40) -> str:
    """Collapse layer indices so long key lists stay readable: `a.{0-11}.b.weight`."""
    groups: Dict[str, List[Tuple[int, ...]]] = {}
    for key in sorted(keys):
        numbers = tuple(int(n) for n in re.findall(r"(?<=\.)\d+(?=\.|$)", key))
        pattern = re.sub(r"(?<=\.)\d+(?=\.|$)", "#", key)
        groups.setdefault(pattern, []).append(numbers)
    lines = []
    for pattern, numbers in groups.items():
        text = pattern
        for pos in range(pattern.count("#")):
            values = sorted({n[pos] for n in numbers})
            text = text.replace("#", _ranges(values), 1)
        lines.append(text)
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more patterns"]
    return ", ".join(lines)


def _ranges(values: List[int]) -> str:
    if len(values) == 1:
        return str(values[0])
    if values == list(range(values[0], values[-1] + 1)):
        return f"{{{values[0]}-{values[-1]}}}"
    return "{" + ",".join(map(str, values)) + "}"


@dataclass
class ConversionReport:
    source: str
    target: str
    mapped: int = 0
    dropped: Dict[str, List[str]] = field(default_factory=dict)  # reason -> keys
    notes: List[str] = field(default_factory=list)

    def drop(self, reason: str, key: str) -> None:
        self.dropped.setdefault(reason, []).append(key)

    def __str__(self) -> str:
        lines = [f"{self.source} -> {self.target}: mapped {self.mapped} tensors"]
        for reason, keys in self.dropped.items():
            lines.append(f"  dropped {len(keys)} ({reason}): {summarize_keys(keys, limit=8)}")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


def check_keys(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], what: str,
               required: Optional[Iterable[str]] = None) -> None:
    """Raise WeightConversionError unless every `required` key (default: all expected) is present, no key
    is unknown and every shape matches."""
    required = set(expected if required is None else required)
    missing = sorted(required - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k])}"
             for k in sorted(set(state) & set(expected)) if tuple(state[k].shape) != tuple(expected[k])]
    if missing or unexpected or wrong:
        parts = [f"{what}: the weights do not match the model"]
        if missing:
            parts.append(f"missing {len(missing)}: {summarize_keys(missing, limit=1000)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {summarize_keys(unexpected, limit=1000)}")
        if wrong:
            parts.append(f"wrong shape {len(wrong)}: " + "; ".join(wrong))
        raise WeightConversionError("\n  ".join(parts))


def expected_shapes(vision: Union[str, PathLike, VisionConfig], text, vocab_size: Optional[int] = None
                    ) -> Dict[str, torch.Size]:
    """Our state dict's key -> shape for a pair of configs, without allocating weights."""
    from .clip import build_clip

    with torch.device("meta"):
        model = build_clip(vision, text, vocab_size=vocab_size)
    return {k: v.shape for k, v in model.state_dict().items()}


def expected_state(vision, text, vocab_size: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Our state dict for a pair of configs as meta tensors (shapes only, no memory)."""
    from .clip import build_clip

    with torch.device("meta"):
        return build_clip(vision, text, vocab_size=vocab_size).state_dict()


def image_tower_shapes(vision: Union[str, PathLike, VisionConfig]) -> Dict[str, torch.Size]:
    """`visual.*` and `logit_scale` shapes of our model for a vision config."""
    from .vit import VisionTransformer

    with torch.device("meta"):
        visual = VisionTransformer(load_vision_config(vision))
    shapes = {"visual." + k: v.shape for k, v in visual.state_dict().items()}
    shapes["logit_scale"] = torch.Size([1])
    return shapes


# --------------------------------------------------------------------------------------------------
# Reading and writing files
# --------------------------------------------------------------------------------------------------

def is_torchscript(path: PathLike) -> bool:
    """TorchScript archives are zip files with a constants.pkl (torch.load refuses them with
    weights_only=True)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, IsADirectoryError):
        return False


def load_weights_file(path: PathLike) -> dict:
    """torch.load(weights_only=True) of a .pt/.bin, or a .safetensors file; clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise WeightConversionError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if is_torchscript(path):
        raise WeightConversionError(
            f"{path}: this is a TorchScript archive (OpenAI's format). Convert it first with "
            f"`python launch/convert_weights.py openai-vit --input {path} --output OUT.pt`")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for pickled code, RuntimeError for a truncated file, ...
        raise WeightConversionError(f"{path}: cannot load with torch.load(weights_only=True): {e}") from None
    if not isinstance(obj, dict):
        raise WeightConversionError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def _tensors_only(obj: Mapping, path: PathLike) -> StateDict:
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightConversionError(f"{path}: not a state dict; non-tensor entries: {bad[:10]}")
    return dict(obj)


def save_state_dict(state: Mapping[str, torch.Tensor], path: PathLike) -> None:
    """Atomic torch.save of plain tensors (contiguous, detached), loadable with weights_only=True."""
    state = {k: v.detach().contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def save_checkpoint_dict(obj: dict, path: PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# --------------------------------------------------------------------------------------------------
# Vision configs from weights
# --------------------------------------------------------------------------------------------------

def infer_vision_config(state: Mapping[str, torch.Tensor], prefix: str = "visual.") -> VisionConfig:
    """Read a ViT's shape from OpenAI-layout weights. Heads are not stored in the weights: we take them
    from the named config with the same shapes (ViT-H-14 uses 80-wide heads), else OpenAI's width // 64."""
    try:
        width = state[prefix + "class_embedding"].shape[0]
        patch = state[prefix + "conv1.weight"].shape[-1]
        positions = state[prefix + "positional_embedding"].shape[0]
        embed_dim = state[prefix + "proj"].shape[1]
    except KeyError as e:
        raise WeightConversionError(f"not a ViT in OpenAI's layout: no {e.args[0]!r} "
                                    f"(ResNet CLIP models are not supported)") from None
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions:
        raise WeightConversionError(f"{prefix}positional_embedding has {positions} rows, not grid^2 + 1")
    layer_ids = {int(m.group(1)) for k in state
                 if (m := re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.", k))}
    if not layer_ids or layer_ids != set(range(len(layer_ids))):
        raise WeightConversionError(f"{prefix}transformer.resblocks: layer indices {sorted(layer_ids)} "
                                    "are not 0..N-1")
    act = "quick_gelu"
    shape = dict(embed_dim=embed_dim, image_resolution=grid * patch, vision_layers=len(layer_ids),
                 vision_width=width, vision_patch_size=patch)
    named = match_vision_config(VisionConfig(**shape, vision_heads=max(1, width // 64), act=act))
    heads = load_vision_config(named).vision_heads if named else max(1, width // 64)
    return VisionConfig(**shape, vision_heads=heads, act=act)


def match_vision_config(cfg: VisionConfig) -> Optional[str]:
    """The named vision config with the same tensor shapes (heads and activation aside), if any."""
    keys = ("embed_dim", "image_resolution", "vision_layers", "vision_width", "vision_patch_size")
    for name in list_model_configs()["vision"]:
        named = load_vision_config(name)
        if all(getattr(named, k) == getattr(cfg, k) for k in keys):
            return name
    return None


def match_text_config(config) -> Optional[str]:
    """The named text config with the same architecture fields, if any."""
    want = arch_dict(config)
    for name in list_model_configs()["text"]:
        if arch_dict(load_text_config(name)) == want:
            return name
    return None


# --------------------------------------------------------------------------------------------------
# OpenAI TorchScript -> image tower
# --------------------------------------------------------------------------------------------------

def convert_openai(path: PathLike) -> Tuple[StateDict, VisionConfig, ConversionReport]:
    """OpenAI CLIP checkpoint -> (`visual.*` + `logit_scale` [1], inferred VisionConfig, report).

    A TorchScript archive (OpenAI's own ViT-B-16.pt) is opened with torch.jit.load, which EXECUTES
    code stored in the file: only use files from a source you trust. A plain state dict with OpenAI's
    keys is loaded with weights_only=True instead."""
    path = Path(path)
    if not path.is_file():
        raise WeightConversionError(f"{path}: file not found")
    if is_torchscript(path):
        with warnings.catch_warnings():  # torch 2.14 marks TorchScript deprecated; the format is what it is
            warnings.simplefilter("ignore", FutureWarning)
            archive = torch.jit.load(str(path), map_location="cpu")
        source = archive.state_dict()
        del archive
        kind = "OpenAI TorchScript"
    else:
        source = load_weights_file(path)
        kind = "OpenAI state dict"
    report = ConversionReport(f"{kind} {path}", "image tower (visual.*, logit_scale)")
    out: StateDict = {}
    for key, value in source.items():
        if key.startswith("visual."):
            out[key] = value.detach().clone()
        elif key == "logit_scale":
            out[key] = value.detach().reshape(1).clone()  # OpenAI's is 0-dim; ours is [1] for DeepSpeed
        elif key in ("input_resolution", "context_length", "vocab_size"):
            report.drop("scalar metadata", key)
        else:
            report.drop("text tower of OpenAI's CLIP, not used", key)
    if "logit_scale" not in out:
        raise WeightConversionError(f"{path}: no logit_scale; is this an OpenAI CLIP checkpoint?")
    cfg = infer_vision_config(out)
    check_keys(out, image_tower_shapes(cfg), f"{path} (visual)")
    report.mapped = len(out)
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in out.values()})
    name = match_vision_config(cfg)
    report.notes.append(f"vision: {name or 'no named config matches'} ({cfg.to_dict()}); stored dtype {dtypes}")
    return out, cfg, report


# --------------------------------------------------------------------------------------------------
# Chinese RoBERTa folder -> text tower
# --------------------------------------------------------------------------------------------------

def _read_folder_weights(folder: Path) -> StateDict:
    """model.safetensors / pytorch_model.bin, or their sharded forms (*.index.json)."""
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return _tensors_only(load_weights_file(folder / single), folder / single)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            state: StateDict = {}
            for shard in sorted(set(weight_map.values())):
                state.update(_tensors_only(load_weights_file(folder / shard), folder / shard))
            return state
    raise WeightConversionError(f"{folder}: no model.safetensors, pytorch_model.bin or sharded index found")


def _fix_legacy_names(key: str) -> str:
    # TF-converted BERT checkpoints name LayerNorm parameters gamma/beta.
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))


def read_roberta_config(folder: PathLike):
    folder = Path(folder)
    for name in ("config.json", "bert_config.json"):
        if (folder / name).is_file():
            try:
                fields = json.loads((folder / name).read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise WeightConversionError(f"{folder / name}:{e.lineno}: not valid JSON ({e.msg})") from None
            try:
                return make_bert_config(fields, source=str(folder / name), strict=False)
            except ValueError as e:
                raise WeightConversionError(str(e)) from None
    raise WeightConversionError(f"{folder}: no config.json or bert_config.json")


def convert_roberta(folder: PathLike):
    """Chinese RoBERTa-wwm-ext folder -> (`bert.*` state dict, BertConfig, report). The MLM/NSP heads
    (`cls.*`) and the pooler are dropped; every other tensor must map onto BertModel."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightConversionError(f"{folder}: not a directory (expected a RoBERTa folder with config.json "
                                    "or bert_config.json, vocab.txt and the weights)")
    config = read_roberta_config(folder)
    source = _read_folder_weights(folder)
    report = ConversionReport(f"RoBERTa folder {folder}", "text tower (bert.*)")
    if not (folder / "vocab.txt").is_file():
        report.notes.append("warning: no vocab.txt beside the weights (the tokenizer needs it)")
    out: StateDict = {}
    for key, value in source.items():
        name = _fix_legacy_names(key)
        if name.startswith("cls."):
            report.drop("pre-training heads (MLM/NSP)", key)
            continue
        if not name.startswith("bert."):
            name = "bert." + name  # a bare BertModel.save_pretrained folder has no prefix
        if name.startswith("bert.pooler."):
            report.drop("pooler (CLIP uses the [CLS] hidden state)", key)
        elif name.endswith(_BUFFER_SUFFIXES):
            report.drop("index buffers, not weights", key)
        else:
            out[name] = value
    from .text import build_bert

    with torch.device("meta"):
        expected = {"bert." + k: v.shape for k, v in build_bert(config).state_dict().items()}
    check_keys(out, expected, f"{folder}")
    report.mapped = len(out)
    name = match_text_config(config)
    report.notes.append(f"text: {name or 'no named config matches'} ({arch_dict(config)})")
    return out, config, report


def check_text_compatible(model_config, folder_config, source: str) -> None:
    """Same architecture apart from the vocabulary size (checked by shapes)? Heads and activation do not
    show in tensor shapes, so compare the config fields."""
    a, b = arch_dict(model_config), arch_dict(folder_config)
    diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    if diff:
        raise WeightConversionError(f"{source}: text config differs from the model's "
                                    f"(field: model vs file): {diff}")


# --------------------------------------------------------------------------------------------------
# Chinese-CLIP checkpoints
# --------------------------------------------------------------------------------------------------

def from_chinese_clip(checkpoint: Mapping, source: str = "Chinese-CLIP checkpoint") -> Tuple[StateDict, ConversionReport]:
    """{"state_dict": {"module.visual...": ...}} (or a bare state dict with or without `module.`) -> ours.
    Keys are checked against a model by the caller (load_pretrained_clip / the CLI)."""
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise WeightConversionError(f"{source}: 'state_dict' is not a dict")
    report = ConversionReport(source, "CLIP (ours)")
    if "epoch" in checkpoint or "step" in checkpoint:
        report.notes.append(f"checkpoint of {checkpoint.get('name', '?')!r}, epoch {checkpoint.get('epoch')}, "
                            f"step {checkpoint.get('step')}")
    out: StateDict = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise WeightConversionError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        name = key[len("module."):] if key.startswith("module.") else key
        name = _fix_legacy_names(name)
        if name.startswith("bert.pooler."):
            report.drop("BERT pooler, unused by CLIP", key)
        elif name.endswith(_BUFFER_SUFFIXES):
            report.drop("index buffers, not weights", key)
        elif name == "logit_scale":
            out[name] = value.reshape(1)
        else:
            out[name] = value
    report.mapped = len(out)
    return out, report


def to_chinese_clip(state: Mapping[str, torch.Tensor], name: str = "converted", epoch: int = 0,
                    step: int = 0) -> dict:
    """Ours -> Chinese-CLIP's checkpoint dict: `module.` prefix, 0-dim logit_scale (as cn_clip builds it)."""
    out = {}
    for key, value in state.items():
        value = value.detach().contiguous()
        out["module." + key] = value.reshape(()) if key == "logit_scale" else value
    return {"epoch": int(epoch), "step": int(step), "name": str(name), "state_dict": out}


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


# --------------------------------------------------------------------------------------------------
# Entry points the trainer calls
# --------------------------------------------------------------------------------------------------

def read_clip_weights(path: PathLike) -> Tuple[StateDict, ConversionReport]:
    """Any full-CLIP source -> our state dict: a ChineseCLIPModel folder, a Chinese-CLIP checkpoint,
    our model file (models/model_file.py) or plain state dict (save_state_dict), or {"module": ...}."""
    path = Path(path)
    if path.is_dir():
        state, _, _, report = convert_hf(path)
        return state, report
    return clip_state_from_object(load_weights_file(path), path)


def clip_state_from_object(obj: Mapping, path: PathLike) -> Tuple[StateDict, ConversionReport]:
    """read_clip_weights for a file already loaded (load_weights_file)."""
    from .model_file import is_model_file

    if is_model_file(obj):
        state = _tensors_only(obj["weights"], path)
        return state, ConversionReport(f"model file {path}", "CLIP (ours)", mapped=len(state))
    if "state_dict" in obj:
        return from_chinese_clip(obj, f"Chinese-CLIP checkpoint {path}")
    if isinstance(obj.get("module"), Mapping):
        return from_chinese_clip(obj["module"], f"checkpoint {path} ('module')")
    state = _tensors_only(obj, path)
    if any(k.startswith("module.") for k in state):
        return from_chinese_clip(state, f"state dict {path}")
    report = ConversionReport(f"state dict {path}", "CLIP (ours)", mapped=len(state))
    if "logit_scale" in state:
        state["logit_scale"] = state["logit_scale"].reshape(1)
    return state, report


def _model_shapes(model: nn.Module) -> Dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items()}


def _copy_into(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    assert not unexpected, unexpected  # check_keys ran first


def load_image_tower(model: nn.Module, path: PathLike) -> str:
    """Load a converted image-tower file (`visual.*`, optionally `logit_scale`) into `model`."""
    state = _tensors_only(load_weights_file(path), path)
    if "logit_scale" in state:
        state["logit_scale"] = state["logit_scale"].reshape(1)
    shapes = _model_shapes(model)
    allowed = {k: v for k, v in shapes.items() if k.startswith("visual.") or k == "logit_scale"}
    check_keys(state, allowed, str(path), required=[k for k in allowed if k.startswith("visual.")])
    _copy_into(model, state)
    return f"image tower: loaded {len(state)} tensors from {path}"


def load_text_tower(model: nn.Module, path: PathLike) -> str:
    """Load a text tower into `model`: a RoBERTa folder, or a converted `bert.*` file (which may also hold
    `text_projection`)."""
    path = Path(path)
    report = None
    if path.is_dir():
        state, config, report = convert_roberta(path)
        check_text_compatible(model.bert.config, config, str(path))
    else:
        state = _tensors_only(load_weights_file(path), path)
        state = {_fix_legacy_names(k): v for k, v in state.items() if not k.endswith(_BUFFER_SUFFIXES)}
    shapes = _model_shapes(model)
    allowed = {k: v for k, v in shapes.items() if k.startswith("bert.") or k == "text_projection"}
    check_keys(state, allowed, str(path), required=[k for k in allowed if k.startswith("bert.")])
    _copy_into(model, state)
    head = f"text tower: loaded {len(state)} tensors from {path}"
    return head if report is None else f"{head}\n{report}"


def load_pretrained_clip(model: nn.Module, path: PathLike) -> str:
    """Load a whole CLIP: a Chinese-CLIP checkpoint, a ChineseCLIPModel folder or our own state dict.
    Every tensor of the model must be present with the right shape."""
    path = Path(path)
    state, report = read_clip_weights(path)
    if path.is_dir():
        vision, text = ours_from_hf_config(json.loads((path / "config.json").read_text()), str(path))
        if vision.vision_heads != model.vision_config.vision_heads or vision.act != model.vision_config.act:
            raise WeightConversionError(f"{path}: vision heads/act {vision.vision_heads}/{vision.act} differ "
                                        f"from the model's {model.vision_config.vision_heads}/{model.vision_config.act}")
        check_text_compatible(model.bert.config, text, str(path))
    check_architecture(state, model.state_dict(), str(path))
    _copy_into(model, state)
    return str(report)


def check_architecture(state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor], what: str) -> None:
    """check_keys, but a different architecture is one line naming what the weights are (read from
    their shapes) and what the model is, and a different text vocabulary raises VocabMismatchError."""
    from .model_file import describe_state, text_shape

    try:
        check_keys(state, {k: v.shape for k, v in model_state.items()}, what)
    except WeightConversionError:
        emb = "bert.embeddings.word_embeddings.weight"
        wrong = {k for k in set(state) & set(model_state) if tuple(state[k].shape) != tuple(model_state[k].shape)}
        if set(state) == set(model_state) and wrong == {emb}:
            raise VocabMismatchError(
                f"{what}: the weights' text vocabulary has {state[emb].shape[0]} tokens, the model's "
                f"{model_state[emb].shape[0]}: use the tokenizer (vocab.txt) the weights were trained with") from None
        theirs, ours = describe_state(state), describe_state(model_state)
        if theirs != ours or text_shape(state) != text_shape(model_state):
            raise WeightConversionError(f"{what}: the weights are {theirs}; the model is {ours}") from None
        raise


def write_config_json(data: dict, path: PathLike) -> None:
    with atomic_write(path) as f:
        json.dump(data, f, indent=2)
        f.write("\n")
