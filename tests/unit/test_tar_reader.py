"""data/images/tar_reader.py against the standard library's tarfile as the oracle: the same regular
members, names and bytes in every format tarfile writes (ustar, GNU, PAX: long and UTF-8 names),
gzip-compressed or not, read from a file or a stream; and errors where tarfile is quiet."""
import io
import tarfile

import pytest

from data.images.tar_reader import TarFormatError, iter_members

NAMES = ["00001.jpg", "00001.txt", "a/b/00002.json", "x" * 120 + "/00003.jpg", "目录/标题.txt",
         "long-" + "y" * 200 + ".txt", "empty.txt", "00004.jpg"]


def _archive(fmt, compress=False, names=NAMES) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if compress else "w", format=fmt) as t:
        d = tarfile.TarInfo("a_dir")
        d.type = tarfile.DIRTYPE
        t.addfile(d)
        for i, name in enumerate(names):
            data = b"" if name == "empty.txt" else bytes(range(256)) * (i * 3 + 1)
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5e9 + 0.25  # a fractional mtime gives PAX a record
            t.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("a_link")
        link.type, link.linkname = tarfile.SYMTYPE, names[0]
        t.addfile(link)
    return buf.getvalue()


def _oracle(blob: bytes):
    with tarfile.open(fileobj=io.BytesIO(blob)) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers() if m.isreg()]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("compress", [False, True])
def test_members_equal_tarfiles(tmp_path, fmt, compress):
    # ustar holds no long or non-ASCII names: only those it can
    names = NAMES if fmt != tarfile.USTAR_FORMAT else [n for n in NAMES if len(n) < 100 and n.isascii()]
    blob = _archive(fmt, compress, names)
    want = _oracle(blob)
    assert len(want) == len(names)
    path = tmp_path / "a.tar"
    path.write_bytes(blob)
    with open(path, "rb") as f:  # a file: skipped members are seeked over
        assert list(iter_members(f, lambda n: True)) == want
    with open(path, "rb", buffering=0) as raw:  # a stream without peek or seek
        assert list(iter_members(_Unseekable(raw), lambda n: True)) == want
    with open(path, "rb") as f:  # declined members come back without their bytes
        assert list(iter_members(f, lambda n: n.endswith(".jpg"))) == \
            [(n, d if n.endswith(".jpg") else None) for n, d in want]


class _Unseekable(io.RawIOBase):
    def __init__(self, raw):
        self.raw = raw

    def readable(self):
        return True

    def readinto(self, b):
        return self.raw.readinto(b)


def _cut_errors(blob: bytes, cut: int) -> str:
    with pytest.raises(TarFormatError) as e:
        list(iter_members(io.BufferedReader(io.BytesIO(blob[:cut])), lambda n: True))
    return str(e.value)


def test_a_tar_cut_between_members_is_an_error_where_tarfile_reads_fewer(tmp_path):
    blob = _archive(tarfile.PAX_FORMAT)
    with tarfile.open(fileobj=io.BytesIO(blob)) as t:
        members = t.getmembers()
    boundary = members[3].offset  # the fourth member's header starts here: a clean cut for tarfile
    with tarfile.open(fileobj=io.BytesIO(blob[:boundary])) as t:
        assert len(t.getmembers()) == 3  # tarfile: a shorter archive, no error
    message = _cut_errors(blob, boundary)
    assert "ends without its end-of-archive block" in message and members[2].name in message


def test_a_cut_in_a_members_data_names_it():
    blob = _archive(tarfile.PAX_FORMAT)
    with tarfile.open(fileobj=io.BytesIO(blob)) as t:
        member = t.getmembers()[4]
    with pytest.raises(TarFormatError) as e:
        list(iter_members(io.BufferedReader(io.BytesIO(blob[:member.offset_data + 10])), lambda n: True))
    assert e.value.member == member.name


def test_a_header_with_a_bad_checksum_is_an_error():
    blob = bytearray(_archive(tarfile.GNU_FORMAT))
    with tarfile.open(fileobj=io.BytesIO(bytes(blob))) as t:
        offset = t.getmembers()[2].offset
    blob[offset + 5] ^= 0x01  # one bit of the third member's name
    assert "bad checksum" in _cut_errors(bytes(blob), len(blob))


def test_cut_compressed_data_is_an_error():
    blob = _archive(tarfile.PAX_FORMAT, compress=True)
    assert "corrupt compressed data" in _cut_errors(blob, len(blob) // 2)
