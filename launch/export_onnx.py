"""Export the image and text encoders of a trained CLIP to ONNX (dynamic batch), and check them.

  python launch/export_onnx.py --run RUN --output OUT

The model: --run RUN (a run of train.py --export) or --weights RUN/model_fp32.pt, whose record brings
the configs and context length (fixed in the export). Other weights need --model and --text-model
(and --context-length, default 52); flags given with a model file must agree with its record.

Writes OUT/image_encoder.onnx, OUT/text_encoder.onnx and OUT/onnx_export.json (inputs, outputs,
context length, resolution). Then runs both in onnxruntime on the CPU at batch sizes 1 and 5 and
compares the features with PyTorch's: exit 1 if any differs by more than --tolerance (1e-4).
Needs the optional packages onnx and onnxruntime (pip install -r tests/requirements-optional.txt).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.files import InputError, report_input_error  # noqa: E402
from engine.inference.model import add_model_flags  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p, context_help="token ids per text, fixed in the export",
                    weights_help="our model_fp32.pt, a Chinese-CLIP .pt or an HF folder (or --run)")
    p.add_argument("--output", required=True, help="folder for the .onnx files")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed feature difference")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    a = p.parse_args(argv)

    from engine.inference.model import load_model
    from engine.inference.source import config_names
    from engine.tools import onnx_export
    from models.text import ARCH_FIELDS

    try:
        onnx_export.require("onnx", *(() if a.no_check else ("onnxruntime",)))
        t0 = time.perf_counter()
        loaded = load_model(a.weights, a.run, a.model, a.text_model, a.vocab, a.context_length, need_weights=True)
        model, context = loaded.model, loaded.context_length
        vision, text = config_names(model.vision_config, model.text_config)  # the configs, by name where named
        written = onnx_export.export(model, a.output, context,
                                     {"model": vision or model.vision_config.to_dict(),
                                      "text_model": text or {k: getattr(model.text_config, k) for k in ARCH_FIELDS},
                                      "weights": str(loaded.weights), "vocab_size": model.text_config.vocab_size})
        print(f"exported in {time.perf_counter() - t0:.1f}s: " + ", ".join(str(w) for w in written))
        if a.no_check:
            return 0
        diffs = onnx_export.max_differences(model, a.output, context)
        worst = max(diffs.values())
        print("onnxruntime vs PyTorch, largest feature difference: "
              + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
        if worst > a.tolerance:
            print(f"export_onnx.py: error: the ONNX features differ from PyTorch's by {worst:.2e} "
                  f"> --tolerance {a.tolerance:g}", file=sys.stderr)
            return 1
    except InputError as e:
        return report_input_error("export_onnx.py", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
