"""Build an LMDB of uint8 image tensors from a MUGE *_imgs.tsv, an image folder or a Chinese-CLIP LMDB.

  python launch/build_lmdb.py --input data/MUGE/train_imgs.tsv --output data/MUGE/lmdb/train --resolution 224

Rerunning the same command resumes an interrupted build (ids already written are skipped).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.images.build_store import build_store  # noqa: E402
from data.images.sources import source_note  # noqa: E402
from data.files import InputError, report_input_error  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="*_imgs.tsv, a folder of <id>.<ext> images, a "
                   "Chinese-CLIP LMDB (its imgs/ folder or the parent), or webdataset/img2dataset tar shards "
                   "('shards/{00000..00099}.tar', a glob, or URLs with fsspec); quote a pattern")
    p.add_argument("--output", required=True, help="folder of the LMDB to create or resume")
    p.add_argument("--resolution", type=int, required=True, help="side R of the stored R×R images")
    p.add_argument("--resize", choices=["squash", "center-crop"], default="squash",
                   help="squash: resize to R×R ignoring the aspect ratio, as Chinese-CLIP trains and "
                   "evaluates (the default; use it with Chinese-CLIP or HF ChineseCLIP weights); center-crop: "
                   "shorter side to R, then the centre R×R, as OpenAI CLIP. Recorded in the store's manifest")
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="on a corrupt image: stop naming it (fail) or list it in a report and go on (skip)")
    p.add_argument("--report", default=None, help="where --on-error skip lists bad ids "
                   "(default OUTPUT/skipped.tsv)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    note = source_note(a.input)
    if note:
        print(f"build_lmdb.py: note: {note}", file=sys.stderr)
    try:
        r = build_store(a.input, a.output, a.resolution, on_error=a.on_error, workers=a.workers,
                        report_path=a.report, progress=not a.no_progress,
                        resize=a.resize)
    except InputError as e:
        return report_input_error("build_lmdb.py", e)
    print(f"{a.output}: {r.manifest['count']} images at {a.resolution}x{a.resolution} "
          f"({a.resize}) "
          f"({r.written} written now, {r.already_present} already present)")
    if a.on_error == "skip":
        print(f"skipped {len(r.skipped)} bad image(s); listed in {r.report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
