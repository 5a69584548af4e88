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
wrongly shaped tensors. --vision / --text take a config name from models/configs or a JSON path.

Examples
  python launch/convert_weights.py openai-vit --input ViT-B-16.pt --output weights/vit-b-16.pt
  python launch/convert_weights.py roberta --input chinese_roberta_wwm_ext_pytorch --output weights/roberta.pt
  python launch/convert_weights.py from-chinese-clip --input clip_cn_vit-b-16.pt --output weights/cn-b16.pt \\
      --vision ViT-B-16 --text RoBERTa-wwm-ext-base-chinese
  python launch/convert_weights.py to-hf --input weights/cn-b16.pt --output hf-folder \\
      --vision ViT-B-16 --text RoBERTa-wwm-ext-base-chinese --vocab chinese_roberta_wwm_ext_pytorch/vocab.txt
  python launch/convert_weights.py to-hf --input logs/NAME/model_fp32.pt --output hf-folder
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # launch/ is not a package: make `models` importable from any cwd
    sys.path.insert(0, str(REPO))

from data.files import report_input_error  # noqa: E402  (light: no torch)

# models (torch, transformers) is imported in main(), after parsing, so that --help answers at once.
convert = load_text_config = load_vision_config = None


def _openai_vit(args) -> str:
    state, cfg, report = convert.convert_openai(args.input)
    if args.vision:
        convert.check_keys(state, convert.image_tower_shapes(args.vision), f"{args.input} vs {args.vision}")
    convert.save_state_dict(state, args.output)
    lines = [str(report), f"wrote {args.output}"]
    if not args.vision and convert.match_vision_config(cfg) is None:
        vpath = Path(args.output).with_suffix(".vision.json")
        convert.write_config_json(cfg.to_dict(), vpath)
        lines.append(f"no named vision config matches: wrote {vpath} (pass it as --vision; check vision_heads, "
                     "which the weights do not record)")
    return "\n".join(lines)


def _roberta(args) -> str:
    state, config, report = convert.convert_roberta(args.input)
    if args.text_model:
        convert.check_text_compatible(load_text_config(args.text_model), config, f"{args.input} vs {args.text_model}")
    convert.save_state_dict(state, args.output)
    return f"{report}\nwrote {args.output}"


def _from_chinese_clip(args) -> str:
    obj = convert.load_weights_file(args.input)
    state, report = convert.from_chinese_clip(obj, f"Chinese-CLIP checkpoint {args.input}")
    convert.check_keys(state, convert.expected_shapes(args.vision, args.text), f"{args.input} vs {args.vision} + {args.text}")
    convert.save_state_dict(state, args.output)
    return f"{report}\nwrote {args.output}"


def _to_chinese_clip(args) -> str:
    state, report = convert.read_clip_weights(args.input)
    convert.check_keys(state, convert.expected_shapes(args.vision, args.text), f"{args.input} vs {args.vision} + {args.text}")
    convert.save_checkpoint_dict(convert.to_chinese_clip(state, name=args.name), args.output)
    return f"{report}\nwrote Chinese-CLIP checkpoint {args.output}"


def _from_hf(args) -> str:
    state, vision, text, report = convert.convert_hf(args.input)
    convert.save_state_dict(state, args.output)
    lines = [str(report), f"wrote {args.output}"]
    if convert.match_vision_config(vision) is None or convert.match_text_config(text) is None:
        out = Path(args.output)
        vpath, tpath = out.with_suffix(".vision.json"), out.with_suffix(".text.json")
        convert.write_config_json(vision.to_dict(), vpath)
        convert.write_config_json(convert.config_to_json_dict(text), tpath)
        lines.append(f"no named config matches: wrote {vpath} and {tpath} (pass them as --vision/--text)")
    return "\n".join(lines)


def _to_hf(args) -> str:
    """Our model file needs no flags (its record has the configs, vocab and preprocessing); other
    weights need --vision and --text, and the text vocabulary is sized from the weights."""
    import tempfile

    from models.weights import model_file

    path = model_file.resolve_weights(args.input, args.run)
    if path is None:
        raise ValueError("to-hf needs --input or --run")
    if path.is_dir():
        (state, report), record = convert.read_clip_weights(path), None
    else:
        obj = convert.load_weights_file(path)
        record = model_file.unwrap(obj, path)[1]
        state, report = convert.clip_state_from_object(obj, path)
        del obj
    if record is not None:
        model_file.check_flags(record, path, args.vision, args.text, args.vocab)
        if args.resize and args.resize != record["image"]["resize"]:
            raise ValueError(f"--resize {args.resize} conflicts with {path}, trained on images resized by "
                             f"{record['image']['resize']}")
        vision, text = model_file.configs(record, source=str(path))
        with tempfile.TemporaryDirectory(prefix="clip-vocab-") as tmp:
            vocab = args.vocab or model_file.write_vocab(record, tmp)
            out = convert.export_hf(state, vision, text, args.output, vocab=vocab, resize=record["image"]["resize"])
        return f"{report}\n{out}"
    if not (args.vision and args.text):
        raise ValueError(f"{path} records no configs (not a model file of train.py --export): pass --vision and --text")
    shape = convert.text_shape(state)
    vision = load_vision_config(args.vision)
    text = load_text_config(args.text, vocab_size=shape["vocab_size"] if shape else None)
    convert.check_architecture(state, convert.expected_state(vision, text), str(path))
    out = convert.export_hf(state, vision, text, args.output, vocab=args.vocab, resize=args.resize or "squash")
    return f"{report}\n{out}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help_text, input_help, output_help, configs=False, optional_configs=False):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--input", required=not optional_configs, help=input_help)
        p.add_argument("--output", required=True, help=output_help)
        if configs:
            hint = " (default: the model file's record)" if optional_configs else ""
            p.add_argument("--vision", required=not optional_configs,
                           help=f"vision config name or JSON (e.g. ViT-B-16){hint}")
            p.add_argument("--text", required=not optional_configs,
                           help=f"text config name or JSON (e.g. RoBERTa-wwm-ext-base-chinese){hint}")
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
        "Chinese-CLIP .pt ({'state_dict': {'module.*': ...}})", "our .pt", configs=True)
    p = add("to-chinese-clip", _to_chinese_clip, "ours -> Chinese-CLIP checkpoint (module. prefix, 0-dim logit_scale).",
            "our .pt (or any source load_pretrained_clip reads)", "Chinese-CLIP .pt", configs=True)
    p.add_argument("--name", default="converted", help="the checkpoint's 'name' field")
    add("from-hf", _from_hf, "transformers ChineseCLIPModel folder -> ours (configs read from config.json; "
        "written beside the output when no named config matches).", "ChineseCLIPModel folder", "our .pt")
    p = add("to-hf", _to_hf, "ours -> transformers ChineseCLIPModel folder (from_pretrained loads it), with "
            "tokenizer and image processor. Our model_fp32.pt needs only --input/--output (or --run).",
            "our model_fp32.pt (or any source load_pretrained_clip reads)", "new or empty folder",
            configs=True, optional_configs=True)
    p.add_argument("--run", help="a run dir of launch/train.py --export: its model_fp32.pt is the input")
    p.add_argument("--vocab", help="vocab.txt: the tokenizer files to write (default: the model file's)")
    p.add_argument("--resize", choices=["squash", "center-crop"], default=None,
                   help="how the image processor resizes (default: the model file's record, else squash)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    global convert, load_text_config, load_vision_config
    from models import weights as convert
    from models.config import load_text_config, load_vision_config

    try:
        print(args.func(args))
    except ValueError as e:  # WeightConversionError / InputError (bad files), unknown config names
        return report_input_error("convert_weights.py", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
