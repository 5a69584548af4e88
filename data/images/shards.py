"""webdataset / img2dataset tar shards read as samples: key, image, captions.

img2dataset's webdataset output is a folder of `{shard}.tar` (with `{shard}.parquet` and
`{shard}_stats.json` beside them, never read here); each tar holds, per sample, members named
`{key}.jpg`, `{key}.txt` (the caption) and `{key}.json` (metadata, the caption among it). A sample is
the run of consecutive members sharing a key (webdataset's rule: the key is the member's path up to
the first dot of its file name). Failed downloads leave gaps in the keys; nothing is assumed about
them.

Shards are named by a spec: brace ranges and lists (`shards/{00000..01023}.tar`, the `braceexpand`
package that webdataset itself uses), globs (`shards/*.tar`), or several specs joined by `::`.
A spec with a URL scheme (`s3://...`) is opened through fsspec when it is installed (optional).

Tars are read by data/images/tar_reader.py, one member at a time (memory stays at one sample
whatever the shard size): ~3x the samples/s of the standard library's `tarfile` (which webdataset's
own reader wraps), and strict where `tarfile` is quiet: a tar cut at a member boundary is an error
here, not a shorter shard.

Image ids come from the key: its integer value when the key is decimal digits (img2dataset's keys
are), else a stable 63-bit hash of the key (`key_image_id`), which the data set's manifest records.
"""
from __future__ import annotations

import collections
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, List, Optional, Tuple

from braceexpand import braceexpand

from data.files import InputError
from data.images.tar_reader import TarFormatError, iter_members

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # key = up to the first dot of the file name
_GLOB_CHARS = set("*?[")
KEY_HASH = "blake2b-64 of the UTF-8 key, top bit cleared"  # written to the manifest


def is_url(spec: str) -> bool:
    return "://" in spec


def is_shard_spec(spec) -> bool:
    """True for what names tar shards rather than a tsv, folder or LMDB: a .tar path, a brace or
    glob pattern of them, or a URL."""
    s = str(spec)
    if is_url(s) or "{" in s or "::" in s:
        return True
    if Path(s).is_dir():
        return False
    return s.endswith(TAR_SUFFIXES) or (bool(_GLOB_CHARS & set(s)) and not Path(s).exists())


def _fsspec():
    try:
        import fsspec
    except ImportError:
        raise InputError("reading shards from a URL needs fsspec (and the file system's own package, e.g. "
                         "s3fs): pip install fsspec") from None
    return fsspec


def expand_shards(spec: str) -> List[str]:
    """Every shard a spec names, in the spec's order (a glob's matches sorted); InputError when a
    part names none or a local shard does not exist."""
    out: List[str] = []
    for part in str(spec).split("::"):
        for name in braceexpand(part):
            if _GLOB_CHARS & set(name):
                if is_url(name):
                    fs, _, paths = _fsspec().get_fs_token_paths(name)
                    found = sorted(fs.unstrip_protocol(p) for p in paths)
                else:
                    found = sorted(glob.glob(name))
                if not found:
                    raise InputError(f"{name}: no shard matches this pattern")
                out.extend(found)
            else:
                if not is_url(name) and not Path(name).is_file():
                    raise InputError(f"{name}: shard not found (from --images {spec})")
                out.append(name)
    if not out:
        raise InputError(f"{spec}: names no shard")
    dupes = [u for u, n in collections.Counter(out).items() if n > 1]
    if dupes:
        raise InputError(f"{spec}: names shard {dupes[0]} more than once")
    return out


def open_shard(url: str) -> IO[bytes]:
    if is_url(url):
        return _fsspec().open(url, "rb").open()
    return open(url, "rb")


def key_image_id(key: str) -> Tuple[int, bool]:
    """(image id, whether it is a hash): the key's integer value when it is decimal digits that fit
    an int64, else a stable 63-bit hash of it."""
    name = key.rsplit("/", 1)[-1]
    if name.isdigit() and name.isascii() and int(name) < 1 << 63:
        return int(name), False
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1), True


@dataclass
class Sample:
    url: str
    key: str
    image: bytes = b""
    captions: List[str] = field(default_factory=list)
    error: str = ""        # why the sample is unusable ("" when it is fine)
    reason: str = ""       # the error's kind, for the per-reason counts

    @property
    def where(self) -> str:
        return f"{self.url} (key {self.key})"


def _captions(members: dict, caption_from: str) -> Tuple[List[str], str, str]:
    """(captions, error, reason) of one sample's members {extension: bytes}."""
    if caption_from == "txt":
        if "txt" not in members:
            return [], "no .txt caption in the sample", "missing caption"
        try:
            texts = [members["txt"].decode("utf-8").strip()]
        except UnicodeDecodeError:
            return [], "the .txt caption is not UTF-8", "bad caption"
    else:
        name = caption_from.split(":", 1)[1]
        if "json" not in members:
            return [], "no .json in the sample", "missing caption"
        try:
            value = json.loads(members["json"].decode("utf-8")).get(name)
        except (UnicodeDecodeError, ValueError, AttributeError):
            return [], "the .json is not a JSON object", "bad caption"
        if isinstance(value, str):
            texts = [value.strip()]
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            texts = [v.strip() for v in value]  # several captions of one image
        else:
            return [], f"the .json has no caption field {name!r} (a string or a list of strings)", "missing caption"
    if not all(texts):
        return [], "empty caption", "empty caption"
    return texts, "", ""


def _sample(url: str, key: str, members: dict, caption_from: str) -> Sample:
    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    captions, error, reason = _captions(members, caption_from) if caption_from else ([], "", "")
    if image_ext is None:
        error, reason = f"no image member ({', '.join('.' + e for e in IMAGE_EXTS[:4])}, ...)", "missing image"
    return Sample(url, key, members.get(image_ext, b"") if image_ext else b"", captions, error, reason)


def iter_samples(url: str, caption_from: Optional[str] = "txt") -> Iterator[Sample]:
    """The samples of one shard in order (caption_from None: images only). A truncated or corrupt
    tar ends the shard with a Sample whose reason is "truncated tar", naming the key being read (the
    sample it cut is not yielded)."""
    key, members, exts = None, {}, set()
    want = set(IMAGE_EXTS) | ({"txt"} if caption_from == "txt" else {"json"} if caption_from else set())

    def wanted(name: str) -> bool:
        m = _KEY_RE.match(name)
        return m is not None and m.group(2).lower() in want

    try:
        with open_shard(url) as f:
            for name, data in iter_members(f, wanted):
                m = _KEY_RE.match(name)
                if m is None or os.path.basename(name).startswith("__"):
                    continue  # no extension, or webdataset's __meta__-style members
                k, ext = m.group(1), m.group(2).lower()
                if k != key or ext in exts:  # a member seen again: the key repeats, a new sample begins
                    if key is not None:
                        yield _sample(url, key, members, caption_from)
                    key, members, exts = k, {}, set()
                exts.add(ext)
                if data is not None:
                    members[ext] = data
    except (TarFormatError, OSError) as e:
        cut = _KEY_RE.match(e.member) if isinstance(e, TarFormatError) and e.member else None
        key = cut.group(1) if cut else key
        after = f"at key {key}" if key is not None else "at its start"
        yield Sample(url, key or "-", error=f"truncated or corrupt tar {after} ({e}); the samples before it are "
                     f"read", reason="truncated tar")
        return
    if key is not None:
        yield _sample(url, key, members, caption_from)


def check_caption_from(caption_from: str) -> str:
    if caption_from == "txt" or (caption_from.startswith("json:") and len(caption_from) > 5):
        return caption_from
    raise InputError(f"--caption-from {caption_from!r}: use txt (each sample's .txt) or json:FIELD (a field of "
                     f"its .json: a string, or a list of strings for several captions)")
