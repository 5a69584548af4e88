#!/usr/bin/env python
"""Convert CLIP weights between OpenAI, Chinese RoBERTa, Chinese-CLIP, transformers and our format.

Formats
  ours            torch.save'd plain state dict of our CLIP: visual.* (OpenAI ViT layout), bert.*
                  (BertModel without pooler), text_projection [text_hidden, embed_dim], logit_scale [1].
                  Partial files hold only visual.* (+ logit_scale) or only bert.*. Loaded with
                  torch.load(weights_only=True).
  openai          OpenAI's CLIP checkpoint as distributed (e.g. ViT-B-16.pt): a TorchScript archive.
                  WARNING: it is opened with torch.jit.load, which EXECUTES code stored in the file;
                  only convert files from a source you trust. A plain state dict with OpenAI's keys is
                  loaded with weights_only=True instead. Only visual.* and logit_scale are kept; the
                  text transformer is dropped (listed in the report).
  roberta         a Chinese RoBERTa-wwm-ext folder: config.json or bert_config.json, vocab.txt, and
                  pytorch_model.bin or model.safetensors (keys prefixed bert.; MLM/NSP heads `cls.*` and
                  the pooler are ignored).
  chinese-clip    Chinese-CLIP's checkpoint: {"epoch", "step", "name", "state_dict"}, keys prefixed
                  module., 0-dim logit_scale (e.g. clip_cn_vit-b-16.pt).
  hf              a transformers ChineseCLIPModel folder (config.json + model.safetensors or
                  pytorch_model.bin), as written by save_pretrained.

Every conversion prints what it mapped and dropped, and fails listing the keys on unmapped, missing or
wrongly shaped tensors. Every file a command writes appears only when the whole conversion succeeded
(temporaries renamed into place at the end): a failed or killed conversion leaves no part of its result.

A whole model is named the way every tool names one: our model_fp32.pt or its run (--run RUN), whose
record brings the configs and vocabulary, or a ChineseCLIPModel folder (its config.json); --vision /
--text (a config name from models/configs or a JSON path) are then needed only for weights that record
nothing (a Chinese-CLIP checkpoint, a plain state dict), and given anyway they must agree. A text
vocabulary of its own size (the tokenizer's) converts in every direction; where the configs match no
named config, the output gets OUTPUT.vision.json / OUTPUT.text.json beside it, to pass back as
--vision / --text.

Examples
  python launch/convert_weights.py openai-vit --input ViT-B-16.pt --output weights/vit-b-16.pt
  python launch/convert_weights.py roberta --input chinese_roberta_wwm_ext_pytorch --output weights/roberta.pt
  python launch/convert_weights.py from-chinese-clip --input clip_cn_vit-b-16.pt --output weights/cn-b16.pt \\
      --vision ViT-B-16 --text RoBERTa-wwm-ext-base-chinese
  python launch/convert_weights.py to-chinese-clip --run logs/NAME --output cn-format.pt
  python launch/convert_weights.py to-hf --run logs/NAME --output hf-folder
  python launch/convert_weights.py from-hf --input hf-folder --output hf-back.pt
  python launch/convert_weights.py to-hf --input weights/cn-b16.pt --output hf-folder \\
      --vision ViT-B-16 --text RoBERTa-wwm-ext-base-chinese --vocab chinese_roberta_wwm_ext_pytorch/vocab.txt
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # launch/ is not a package: make `models` importable from any cwd
    sys.path.insert(0, str(REPO))

from data.files import atomic_paths, report_input_error  # noqa: E402  (light: no torch)
from engine.inference.naming import CONVERT_FLAGS  # noqa: E402  (light: no torch)

# torch, transformers and the weight formats are imported in main(), after parsing, so that --help
# answers at once.
convert = source = torch = load_text_config = config_to_json_dict = None


def _config_files(out, vision=None, text=None) -> dict:
    """The config JSONs to write beside `out` for configs that no named config is (the text one with
    its vocabulary's size): {path: content}. Read the file back with them as --vision / --text."""
    out, files = Path(out), {}
    named_vision, _ = source.config_names(vision, text) if vision is not None else (None, None)
    if vision is not None and named_vision is None:
        files[out.with_suffix(".vision.json")] = vision.to_dict()
    if text is not None and convert.match_text_config(text) is None:
        files[out.with_suffix(".text.json")] = config_to_json_dict(text)
    return files


def _write(out, save, configs: dict) -> str:
    """Write `out` (save(temporary_path)) and the config JSONs beside it, all or nothing."""
    paths = list(configs) + [Path(out)]
    with atomic_paths(*paths) as temps:
        for tmp, content in zip(temps, configs.values()):
            tmp.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        save(temps[-1])
    lines = [f"wrote {out}"]
    if configs:
        lines.append("no named config matches: wrote " + " and ".join(map(str, configs)) + " beside it "
                     "(pass them as --vision/--text to read it back)")
    return "\n".join(lines)


def _save_state(state):
    return lambda path: torch.save({k: v.detach().contiguous() for k, v in state.items()}, path)


def _openai_vit(args) -> str:
    state, cfg, report = convert.convert_openai(args.input)
    if args.vision:
        convert.check_keys(state, convert.image_tower_shapes(args.vision), f"{args.input} vs {args.vision}")
    unnamed = not args.vision and convert.match_vision_config(cfg) is None
    out = _write(args.output, _save_state(state), _config_files(args.output, cfg) if unnamed else {})
    note = " (check vision_heads, which the weights do not record)" if unnamed else ""
    return f"{report}\n{out}{note}"


def _roberta(args) -> str:
    state, config, report = convert.convert_roberta(args.input)
    if args.text_model:
        convert.check_text_compatible(load_text_config(args.text_model), config, f"{args.input} vs {args.text_model}")
    return f"{report}\n{_write(args.output, _save_state(state), {})}"


def _open(args, **kw):
    """The model an export or import names, through the one helper every tool uses."""
    return source.open_model(args.input, getattr(args, "run", None), getattr(args, "vision", None),
                             getattr(args, "text", None),
                             flags=CONVERT_FLAGS, need_weights=True, **kw)


def _from_chinese_clip(args) -> str:
    src = _open(args, need_configs=True)
    return f"{src.report}\n{_write(args.output, _save_state(src.state), {})}"


def _to_chinese_clip(args) -> str:
    src = _open(args, need_configs=True)
    ckpt = convert.to_chinese_clip(src.state, name=args.name)
    out = _write(args.output, lambda path: torch.save(ckpt, path), _config_files(args.output, src.vision, src.text))
    return f"{src.report}\nChinese-CLIP checkpoint: {out}"


def _from_hf(args) -> str:
    if not Path(args.input).is_dir():
        raise ValueError(f"--input {args.input}: not a folder (a ChineseCLIPModel folder holds config.json and "
                         "the weights)")
    src = _open(args)
    return f"{src.report}\n{_write(args.output, _save_state(src.state), _config_files(args.output, src.vision, src.text))}"


def _to_hf(args) -> str:
    """Our model file (or run) needs no flags: its record has the configs, vocab and preprocessing;
    other weights need --vision and --text, and the text vocabulary is sized from the weights."""
    import tempfile

    src = _open(args, vocab=args.vocab, resize=args.resize, need_configs=True)
    with tempfile.TemporaryDirectory(prefix="clip-vocab-") as tmp:  # the folder is written atomically
        out = convert.export_hf(src.state, src.vision, src.text, args.output, vocab=src.write_vocab(tmp),
                                resize=src.image["resize"] or "squash")
    return f"{src.report}\n{out}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help_text, input_help, output_help, configs=None):
        """configs: None (a tower: no config flags), "required", or "recorded" (the model names them)."""
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--input", required=configs != "recorded", help=input_help)
        p.add_argument("--output", required=True, help=output_help)
        if configs:
            hint = " (default: what the model file or folder records)" if configs == "recorded" else ""
            p.add_argument("--vision", required=configs == "required",
                           help=f"vision config name or JSON (e.g. ViT-B-16){hint}")
            p.add_argument("--text", required=configs == "required",
                           help=f"text config name or JSON (e.g. RoBERTa-wwm-ext-base-chinese){hint}")
        if configs == "recorded":
            p.add_argument("--run", help="a run dir of launch/train.py --export: its model_fp32.pt is the input")
        p.set_defaults(func=func)
        return p

    p = add("openai-vit", _openai_vit,
            "OpenAI CLIP checkpoint (TorchScript ViT-B-16.pt etc.) -> ours, image tower only. "
            "EXECUTES code stored in a TorchScript file (torch.jit.load): trusted files only.",
            "OpenAI .pt (TorchScript archive, or a plain state dict with OpenAI's keys)",
            "our image-tower .pt (visual.*, logit_scale [1])")
    p.add_argument("--vision", help="also check the weights fit this vision config")
    p = add("roberta", _roberta, "Chinese RoBERTa-wwm-ext folder -> ours, text tower only (bert.*).",
            "folder with config.json or bert_config.json, vocab.txt, pytorch_model.bin or model.safetensors",
            "our text-tower .pt (bert.*)")
    p.add_argument("--text-model", help="also check the folder's config matches this text config")
    add("from-chinese-clip", _from_chinese_clip, "Chinese-CLIP checkpoint -> ours (whole model).",
        "Chinese-CLIP .pt ({'state_dict': {'module.*': ...}})", "our .pt", configs="required")
    p = add("to-chinese-clip", _to_chinese_clip, "ours -> Chinese-CLIP checkpoint (module. prefix, 0-dim "
            "logit_scale), with OUTPUT.vision.json / .text.json beside it where no named config matches.",
            "our model_fp32.pt (or any whole-model source: a ChineseCLIPModel folder, a state dict)",
            "Chinese-CLIP .pt", configs="recorded")
    p.add_argument("--name", default="converted", help="the checkpoint's 'name' field")
    p = add("from-hf", _from_hf, "transformers ChineseCLIPModel folder -> ours (configs read from config.json; "
            "written beside the output when no named config matches).", "ChineseCLIPModel folder", "our .pt")
    p = add("to-hf", _to_hf, "ours -> transformers ChineseCLIPModel folder (from_pretrained loads it), with "
            "tokenizer and image processor. Our model_fp32.pt needs only --input/--output (or --run).",
            "our model_fp32.pt (or any whole-model source: a Chinese-CLIP .pt, a state dict)",
            "new or empty folder", configs="recorded")
    p.add_argument("--vocab", help="vocab.txt: the tokenizer files to write (default: the model file's)")
    p.add_argument("--resize", choices=["squash", "center-crop"], default=None,
                   help="how the image processor resizes (default: the model file's record, else squash)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    global convert, source, torch, load_text_config, config_to_json_dict
    import torch

    from engine.inference import source
    from models import weights as convert
    from models.config import load_text_config
    from models.text import config_to_json_dict

    try:
        print(args.func(args))
    except ValueError as e:  # WeightConversionError / InputError (bad files), unknown config names
        return report_input_error("convert_weights.py", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
