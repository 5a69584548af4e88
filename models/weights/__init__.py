"""Weight formats in and out of our CLIP state dict, one module per format.

Our state dict ("ours"): `visual.*` (OpenAI ViT layout), `bert.*` (BertModel without pooler),
`text_projection` [text_hidden, embed_dim], `logit_scale` [1].

- openai.py: OpenAI's TorchScript checkpoint (ViT-B-16.pt as distributed) -> `visual.*` +
  `logit_scale`. Only it calls torch.jit.load, which executes code stored in the file; everything
  else loads with weights_only=True.
- roberta.py: a Chinese RoBERTa folder (config.json or bert_config.json, pytorch_model.bin or
  model.safetensors, keys prefixed `bert.`) -> `bert.*`; MLM/NSP heads and pooler ignored.
- chinese_clip.py: Chinese-CLIP checkpoints ({"epoch", "step", "name", "state_dict"}, keys prefixed
  `module.`, 0-dim logit_scale) <-> ours.
- hf.py: a transformers ChineseCLIPModel folder (save_pretrained / from_pretrained) <-> ours.
- model_file.py: our self-describing model file (weights + configs, vocab, context length, image
  preprocessing).
- core.py: errors, reports, key and shape checks, reading and writing files; shapes.py: the
  architecture read from weights' shapes; load.py: the entry points that load weights into a model.

Every conversion returns a ConversionReport (what was mapped, what was dropped and why) and raises
WeightConversionError, listing keys, on unmapped, missing or wrongly shaped tensors.

May import: models' modules (vit, text, config, clip) and data.files. Callers use the names below
(`from models import weights; weights.load_pretrained_clip(...)`).
"""
# ruff: noqa: F401  (the re-exports below are this package's interface)
from .chinese_clip import from_chinese_clip, to_chinese_clip
from .core import (ConversionReport, PathLike, StateDict, VocabMismatchError, WeightConversionError,
                   check_keys, expected_shapes, expected_state, image_tower_shapes, is_torchscript,
                   load_weights_file, save_checkpoint_dict, save_state_dict, summarize_keys, write_config_json)
from .hf import convert_hf, export_hf, from_hf_state, hf_config_from_ours, ours_from_hf_config, to_hf_state
from .load import (check_architecture, clip_state_from_object, load_image_tower, load_pretrained_clip,
                   load_text_tower, read_clip_weights)
from .openai import convert_openai
from .roberta import check_text_compatible, convert_roberta, read_roberta_config
from .shapes import describe_state, infer_vision_config, match_text_config, match_vision_config, text_shape
