"""The MUGE evaluator: scores against an independent implementation, and every schema error."""
import json
import random

import pytest

from engine.scoring.muge import run

from launch.evaluate import main as evaluate_main


def independent_scores(pred_lines, ref_lines):
    """Straight from the definition: a query counts at r if its top-r predictions and its
    reference ids intersect; percentages; mean of the three."""
    preds = {p["query_id"]: p["item_ids"] for p in pred_lines}
    out = {}
    for r in (1, 5, 10):
        hits = sum(1 for ref in ref_lines if set(preds[ref["query_id"]][:r]) & set(ref["item_ids"]))
        out[f"r{r}"] = 100.0 * hits / len(ref_lines)
    out["mean_recall"] = (out["r1"] + out["r5"] + out["r10"]) / 3
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def random_case(seed, n_queries=200, n_images=60):
    rng = random.Random(seed)
    refs, preds = [], []
    for q in range(n_queries):
        qid = 1000 + 7 * q
        refs.append({"query_id": qid, "query_text": f"查询{q}",
                     "item_ids": rng.sample(range(n_images), rng.randint(1, 4))})
        preds.append({"query_id": qid, "item_ids": rng.sample(range(n_images), 10)})
    rng.shuffle(preds)
    return preds, refs


@pytest.mark.parametrize("seed", range(5))
def test_scores_equal_independent_implementation(tmp_path, seed):
    preds, refs = random_case(seed)
    preds.append({"query_id": 1, "item_ids": list(range(10))})  # not in the reference: ignored
    code = run(write_jsonl(tmp_path / "p.jsonl", preds), write_jsonl(tmp_path / "r.jsonl", refs),
               tmp_path / "out.json")
    assert code == 0
    out = json.loads((tmp_path / "out.json").read_text())
    want = independent_scores(preds, refs)
    assert out["success"] is True
    assert out["score"] == pytest.approx(want["mean_recall"], abs=1e-9)
    for key in ("r1", "r5", "r10", "mean_recall"):
        assert out["scoreJson"][key] == pytest.approx(want[key], abs=1e-9)
    assert out["scoreJson"]["score"] == out["score"]
    assert 0 < out["scoreJson"]["r1"] < out["scoreJson"]["r10"] < 100  # the random case is not degenerate


def test_chinese_clip_field_names(tmp_path):
    preds, refs = random_case(11, n_queries=30)
    cc_preds = [{"text_id": p["query_id"], "image_ids": p["item_ids"]} for p in preds]
    cc_refs = [{"text_id": r["query_id"], "text": r["query_text"], "image_ids": r["item_ids"]} for r in refs]
    assert run(write_jsonl(tmp_path / "p.jsonl", cc_preds), write_jsonl(tmp_path / "r.jsonl", cc_refs),
               tmp_path / "o.json") == 0
    got = json.loads((tmp_path / "o.json").read_text())["scoreJson"]
    assert got["mean_recall"] == pytest.approx(independent_scores(preds, refs)["mean_recall"])


SCHEMA_ERRORS = [
    (lambda p: p[0].update(query_id="1000"), r"p.jsonl:1: query id '1000' is not an integer"),
    (lambda p: p[0].pop("query_id"), r"p.jsonl:1: no query id field"),
    (lambda p: p[0].pop("item_ids"), r"p.jsonl:1: no predicted item ids field"),
    (lambda p: p[0].update(item_ids="1,2,3"), r"p.jsonl:1: the predicted ids of query 1000 are not a list"),
    (lambda p: p[0].update(item_ids=list(range(9))), r"query 1000 has 9 predicted ids, exactly 10"),
    (lambda p: p[0].update(item_ids=list(range(11))), r"query 1000 has 11 predicted ids"),
    (lambda p: p[0].update(item_ids=["1"] + list(range(2, 11))), r"non-integer predicted id '1' at rank 1"),
    (lambda p: p[0].update(item_ids=list(range(9)) + [1.5]), r"non-integer predicted id 1.5 at rank 10"),
    (lambda p: p[0].update(item_ids=[True] + list(range(2, 11))), r"non-integer predicted id True"),
    (lambda p: p[0].update(item_ids=[1] * 2 + list(range(2, 10))), r"query 1000 has duplicate predicted ids"),
    (lambda p: p.pop(3), r"1 reference queries have no prediction: 1021"),
    (lambda p: p.append(dict(p[0])), r"query 1000 is predicted twice"),
    (lambda p: p[0].update(query_id=1000, text_id=1007), r"fields query_id and text_id disagree"),
]


@pytest.mark.parametrize("mutate,message", SCHEMA_ERRORS)
def test_each_schema_error_fails_with_a_message(tmp_path, mutate, message):
    preds, refs = random_case(3, n_queries=20)
    preds.sort(key=lambda p: p["query_id"])
    mutate(preds)
    out = tmp_path / "out.json"
    code = run(write_jsonl(tmp_path / "p.jsonl", preds), write_jsonl(tmp_path / "r.jsonl", refs), out)
    result = json.loads(out.read_text())
    assert code != 0
    assert result["success"] is False and result["score"] == 0
    import re

    assert re.search(message, result["errorMsg"]), result["errorMsg"]


def test_bad_json_line_and_missing_file(tmp_path):
    preds, refs = random_case(4, n_queries=5)
    p = write_jsonl(tmp_path / "p.jsonl", preds)
    p.write_text(p.read_text() + "{not json\n")
    r = write_jsonl(tmp_path / "r.jsonl", refs)
    assert run(p, r, tmp_path / "o.json") != 0
    assert "p.jsonl:6: not valid JSON" in json.loads((tmp_path / "o.json").read_text())["errorMsg"]
    assert run(tmp_path / "nope.jsonl", r, tmp_path / "o.json") != 0
    assert "file not found" in json.loads((tmp_path / "o.json").read_text())["errorMsg"]


def test_bad_reference_is_named(tmp_path):
    preds, refs = random_case(5, n_queries=5)
    refs[2]["item_ids"] = ["x"]
    assert run(write_jsonl(tmp_path / "p.jsonl", preds), write_jsonl(tmp_path / "r.jsonl", refs),
               tmp_path / "o.json") != 0
    assert "r.jsonl:3: reference item ids" in json.loads((tmp_path / "o.json").read_text())["errorMsg"]


@pytest.mark.parametrize("with_text", [True, False])
def test_either_argument_order_gives_the_right_score(tmp_path, capsys, with_text):
    # The server's script takes REF PRED OUT, our README PRED REF OUT: the content decides which is which
    # (query texts; else the file with exactly 10 ids per line is the prediction).
    preds, refs = random_case(6, n_queries=30)
    if not with_text:
        refs = [{"query_id": r["query_id"], "item_ids": r["item_ids"]} for r in refs]
    p, r = write_jsonl(tmp_path / "p.jsonl", preds), write_jsonl(tmp_path / "r.jsonl", refs)
    want = independent_scores(preds, refs)["mean_recall"]
    assert evaluate_main([str(p), str(r), str(tmp_path / "a.json")]) == 0
    assert "(told from their content" not in capsys.readouterr().err
    assert evaluate_main([str(r), str(p), str(tmp_path / "b.json")]) == 0  # server order
    err = capsys.readouterr().err
    assert f"reference: {r}; predictions: {p}" in err and "REF PRED" in err
    for name in ("a.json", "b.json"):
        assert json.loads((tmp_path / name).read_text())["score"] == pytest.approx(want, abs=1e-9)


BLANK_LINES = [
    ("extra newline at the end", lambda text: text + "\n", None),
    ("blank line inside", lambda text: text.replace("\n", "\n\n", 1), 2),
    ("whitespace-only line", lambda text: text.replace("\n", "\n  \t\n", 1), 2),
    ("blank first line", lambda text: "\n" + text, 1),
]


@pytest.mark.parametrize("which", ["p.jsonl", "r.jsonl"])
@pytest.mark.parametrize("case,edit,line", BLANK_LINES, ids=[c[0] for c in BLANK_LINES])
def test_blank_lines_are_rejected_like_the_server(tmp_path, which, case, edit, line):
    preds, refs = random_case(8, n_queries=6)
    p, r = write_jsonl(tmp_path / "p.jsonl", preds), write_jsonl(tmp_path / "r.jsonl", refs)
    target = tmp_path / which
    target.write_text(edit(target.read_text(encoding="utf-8")), encoding="utf-8")
    assert run(p, r, tmp_path / "o.json") == 2
    msg = json.loads((tmp_path / "o.json").read_text())["errorMsg"]
    line = line or len(target.read_text(encoding="utf-8").split("\n")) - 1
    assert f"{which}:{line}: blank line" in msg, msg


def test_crlf_line_ends_are_accepted(tmp_path):
    preds, refs = random_case(9, n_queries=6)
    p, r = write_jsonl(tmp_path / "p.jsonl", preds), write_jsonl(tmp_path / "r.jsonl", refs)
    p.write_bytes(p.read_bytes().replace(b"\n", b"\r\n"))
    assert run(p, r, tmp_path / "o.json") == 0


@pytest.mark.parametrize("which", ["p.jsonl", "r.jsonl"])
def test_non_utf8_file_gives_a_result_not_a_traceback(tmp_path, which):
    preds, refs = random_case(10, n_queries=6)
    p, r = write_jsonl(tmp_path / "p.jsonl", preds), write_jsonl(tmp_path / "r.jsonl", refs)
    target = tmp_path / which
    target.write_bytes(target.read_text(encoding="utf-8").encode("utf-8").replace(b"\n", b"\n\xb2\xe9", 1)
                       if which == "p.jsonl" else "".join(
                           json.dumps(x, ensure_ascii=False) + "\n" for x in refs).encode("gbk"))
    assert run(p, r, tmp_path / "o.json") == 2
    result = json.loads((tmp_path / "o.json").read_text())
    assert result["success"] is False
    assert f"{which}:" in result["errorMsg"] and "not UTF-8" in result["errorMsg"]


def test_cli_positional_and_named_flags_agree(tmp_path, capsys):
    preds, refs = random_case(7, n_queries=40)
    p, r = write_jsonl(tmp_path / "p.jsonl", preds), write_jsonl(tmp_path / "r.jsonl", refs)
    assert evaluate_main([str(p), str(r), str(tmp_path / "a.json")]) == 0
    assert evaluate_main(["--pred", str(p), "--ref", str(r), "--out", str(tmp_path / "b.json")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    assert a == json.loads((tmp_path / "b.json").read_text())
    assert set(a) == {"success", "score", "scoreJson"}
    assert set(a["scoreJson"]) == {"score", "mean_recall", "r1", "r5", "r10"}
    assert "mean recall" in capsys.readouterr().out
