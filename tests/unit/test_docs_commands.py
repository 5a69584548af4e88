"""Docs that cannot rot: every command in a fenced bash block of README.md and docs/*.md that runs a
launch/ script (`python launch/x.py ...`, `deepspeed [launcher flags] launch/x.py ...`, `torchrun ...`)
names a script that exists and uses only flags its `--help` offers (a subcommand's own `--help` for
convert_weights.py). The README's Python block is run by test_readme_snippet.py."""
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LAUNCHERS = ("python", "python3", "deepspeed", "torchrun")
SUBCOMMANDS = {"convert_weights.py"}  # scripts whose first argument picks a subcommand with its own flags
FLAG = re.compile(r"(?<![\w-])--[A-Za-z0-9][\w-]*")


def bash_commands(text: str):
    """(line number, command) for every command line of the fenced bash blocks, continuation lines
    joined, comments dropped, `a && b; c` split into commands."""
    out, in_block, pending, start = [], False, "", 0
    for no, line in enumerate(text.splitlines(), start=1):
        if line.strip().startswith("```"):
            in_block = line.strip() in ("```bash", "```sh", "```shell") if not in_block else False
            pending = ""
            continue
        if not in_block:
            continue
        code = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
        if not pending:
            start = no
        pending += code.rstrip().rstrip("\\") + " "
        if code.rstrip().endswith("\\"):
            continue
        for cmd in re.split(r"&&|;|\|\|?|\bdo\b|\bthen\b", pending):
            if cmd.strip():
                out.append((start, cmd.strip()))
        pending = ""
    return out


def launch_call(cmd: str):
    """(script, subcommand or None, flags after the script) of a command that runs launch/x.py, or None."""
    try:
        words = shlex.split(cmd)
    except ValueError:
        words = cmd.split()
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value prefixes
        words = words[1:]
    if not words or Path(words[0]).name not in LAUNCHERS:
        return None
    at = next((i for i, w in enumerate(words) if re.match(r"^launch/[\w.-]+\.py$", w)), None)
    if at is None:
        return None
    script, rest = words[at], words[at + 1:]
    sub = rest[0] if Path(script).name in SUBCOMMANDS and rest and not rest[0].startswith("-") else None
    flags = [w.split("=", 1)[0] for w in rest if FLAG.fullmatch(w.split("=", 1)[0])]
    return script, sub, flags


@lru_cache(maxsize=None)
def offered_flags(script: str, sub=None) -> frozenset:
    argv = [sys.executable, script] + ([sub] if sub else []) + ["--help"]
    p = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{' '.join(argv[1:])} failed:\n{p.stderr[-2000:]}"
    return frozenset(FLAG.findall(p.stdout))


def problems(docs):
    calls = [(doc, no, cmd, launch_call(cmd)) for doc in docs for no, cmd in bash_commands(doc.read_text("utf-8"))]
    calls = [c for c in calls if c[3] is not None]
    wanted = {(c[3][0], c[3][1]) for c in calls if (REPO / c[3][0]).is_file()}
    with ThreadPoolExecutor(2) as pool:  # --help imports torch: two at a time
        list(pool.map(lambda k: offered_flags(*k), sorted(wanted, key=str)))
    found = []
    for doc, no, cmd, (script, sub, flags) in calls:
        where = f"{doc.relative_to(REPO) if doc.is_relative_to(REPO) else doc}:{no}"
        if not (REPO / script).is_file():
            found.append(f"{where}: {script} does not exist")
            continue
        unknown = [f for f in flags if f not in offered_flags(script, sub)]
        if unknown:
            found.append(f"{where}: {script}{' ' + sub if sub else ''} has no {', '.join(unknown)}")
    return found, len(calls)


def test_every_documented_launch_command_uses_real_flags():
    found, n = problems(DOCS)
    assert n >= 20, f"only {n} launch commands found in the docs: is the parser still finding them?"
    assert not found, "\n".join(found)


def test_the_check_catches_a_wrong_flag_and_a_missing_script(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("```bash\n"
                   "python launch/evaluate.py --pred a --ref b --out c   # fine\n"
                   "deepspeed --num_gpus 2 launch/extract.py --run r \\\n    --no-such-flag x\n"
                   "python launch/convert_weights.py to-hf --input a --output b --name x\n"
                   "python launch/nope.py --x\n"
                   "```\n", encoding="utf-8")
    found, n = problems([doc])
    assert n == 4
    assert [f.split(": ", 1)[1] for f in found] == [
        "launch/extract.py has no --no-such-flag", "launch/convert_weights.py to-hf has no --name",
        "launch/nope.py does not exist"]
    assert found[0].startswith(f"{doc}:3: ")  # the line the command starts on


def test_zero_shot_and_onnx_commands_run_as_written(tmp_path):
    """docs/zero-shot-and-onnx.md's zeroshot.py and export_onnx.py commands run as written on a run of
    ours (a model file with its record, context 24), in a scratch folder where their placeholder
    paths exist: what the docs show is what the tools take (no flag shown as needed that the record
    supplies, none that conflicts with it)."""
    import json
    import shutil

    from tests.dist.workers.extract_fixture import build_tiny_split, save_tiny_model_file
    from tests.ranks import base_env

    cmds = [c for _, c in bash_commands((REPO / "docs" / "zero-shot-and-onnx.md").read_text("utf-8"))
            if re.search(r"launch/(zeroshot|export_onnx)\.py", c)]
    assert len(cmds) == 2, cmds
    d = build_tiny_split(tmp_path / "src", n_images=6, n_queries=2)
    shutil.copytree(d["lmdb"], tmp_path / "DATA" / "lmdb" / "valid")
    save_tiny_model_file(d, tmp_path / "logs" / "run1" / "model_fp32.pt")
    (tmp_path / "classes.txt").write_text("红色\n蓝色\n", encoding="utf-8")
    from data.images.store import ImageStore

    with open(tmp_path / "labels.jsonl", "w", encoding="utf-8") as f:
        for n, i in enumerate(ImageStore(d["lmdb"]).ids()):
            f.write(json.dumps({"image_id": i, "label": ["红色", "蓝色"][n % 2]}, ensure_ascii=False) + "\n")
    for cmd in cmds:
        words = shlex.split(cmd)
        if "export_onnx.py" in cmd:
            pytest.importorskip("onnx", reason="optional: pip install -r tests/requirements-optional.txt")
            words.append("--no-check")  # onnxruntime's comparison is test_onnx_export.py's
        words = [sys.executable if w in LAUNCHERS else str(REPO / w) if w.startswith("launch/") else w for w in words]
        p = subprocess.run(words, cwd=tmp_path, env=base_env(), capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"{cmd}\n{p.stdout[-2000:]}{p.stderr[-2000:]}"
    assert json.loads((tmp_path / "zeroshot.json").read_text(encoding="utf-8"))["images"] == 6


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_doc_links_resolve(doc):
    """Relative links between the docs point at files that exist (and at headings that exist)."""
    text = doc.read_text("utf-8")
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            bad.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            bad.append(target)
    assert not bad, f"{doc.name}: broken links {bad}"


@lru_cache(maxsize=None)
def _anchors(md: Path) -> frozenset:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to '-', repeats numbered."""
    seen, out = {}, set()
    in_code = False
    for line in md.read_text("utf-8").splitlines():
        if line.strip().startswith("```"):
            in_code = not in_code
        if in_code or not re.match(r"^#{1,6} ", line):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return frozenset(out)
