"""CPU latency of the exported encoders: onnxruntime vs PyTorch, side by side in one run.

  python tests/benchmarks/bench_onnx.py                                  # ViT-B-16 + RoBERTa base
  python tests/benchmarks/bench_onnx.py --model ViT-demo-64 --text-model BERT-demo \
      --context-length 16 --batches 1 32

Random weights (latency does not depend on their values), exported with launch/export_onnx.py's
code to a temporary folder. Each cell is the median of --repeats calls after one warm-up call (--repeats 3 is enough for ViT-B-16); the
two runtimes alternate call by call, so load from other processes hits both alike. Both use
--threads intra-op threads. Needs onnx and onnxruntime (pip install -r tests/requirements-optional.txt).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

THREADS_DEFAULT = 1  # on a shared 2-core machine, 2 OpenMP threads made torch's timings erratic


def _threads_from_argv() -> int:
    # OpenMP thread pools are sized when torch/onnxruntime load: decide before importing them.
    if "--threads" in sys.argv:
        return int(sys.argv[sys.argv.index("--threads") + 1])
    return THREADS_DEFAULT


os.environ["OMP_NUM_THREADS"] = str(_threads_from_argv())
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--text-model", default="RoBERTa-wwm-ext-base-chinese")
    p.add_argument("--context-length", type=int, default=52)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=THREADS_DEFAULT)
    a = p.parse_args()

    import torch

    from engine.tools import onnx_export
    from models import build_clip

    torch.set_num_threads(a.threads)
    model = build_clip(a.model, a.text_model).eval()
    print(f"{a.model} + {a.text_model}, context {a.context_length}, {a.threads} thread(s), "
          f"torch {torch.__version__}, median of {a.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_export.export(model, tmp, a.context_length, {"model": a.model, "text_model": a.text_model})
        sess = {"pixels": onnx_export.session(f"{tmp}/image_encoder.onnx", a.threads),
                "input_ids": onnx_export.session(f"{tmp}/text_encoder.onnx", a.threads)}
        print(f"{'encoder':8} {'batch':>5} {'torch ms':>10} {'onnxrt ms':>10} {'torch/ort':>9}")
        for b in a.batches:
            x = onnx_export.example_inputs(model, a.context_length, batch=b)
            for inp, name, fn in (("pixels", "image", model.encode_image), ("input_ids", "text", model.encode_text)):
                times = {"torch": [], "ort": []}
                for i in range(a.repeats + 1):
                    with torch.no_grad():
                        t0 = time.perf_counter()
                        fn(x[inp])
                        t1 = time.perf_counter()
                    sess[inp].run(None, {inp: x[inp].numpy()})
                    t2 = time.perf_counter()
                    if i:  # the first call of each warms up
                        times["torch"].append(t1 - t0)
                        times["ort"].append(t2 - t1)
                tm, om = (statistics.median(times[k]) * 1e3 for k in ("torch", "ort"))
                print(f"{name:8} {b:5d} {tm:10.1f} {om:10.1f} {tm / om:9.2f}")


if __name__ == "__main__":
    main()
