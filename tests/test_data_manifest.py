"""Manifests as input (issue 23, item 3): a CSV or JSONL file listing images by URL or path
(relative to the manifest, absolute, file://, s3://), as SageMaker Batch Transform and data
catalogues hand work out. The driver fetches the images and packs them; every entry is one
row with the manifest's id (else its index) and label (an integer, or a class name mapped
as a folder's are), scoring as the same images served from a folder; an unreachable URL or
a file that is not an image is an error row naming it; a bad manifest is refused, naming
the line or column, before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import rows_of, run_cli, run_local, snapshot

from serveless.data.manifest import check_manifest
from serveless.data.sources import scan_inputs
from serveless.driver.prepare import prepare_job
from serveless.errors import JobError, SourceError
from serveless.store import Store

pytest_plugins = ["s3server"]

CLASSES = ["class_000", "class_001", "class_002"]


@pytest.fixture(scope="module")
def photos(image_dir) -> list[tuple[str, str]]:
    """(path relative to the folder, class folder) of the 60 sample photos, in folder order."""
    files = sorted(image_dir.rglob("*.jpg"), key=lambda p: p.relative_to(image_dir).parts)
    return [(p.relative_to(image_dir).as_posix(), p.parent.name) for p in files]


def _same_scores(rows: list[dict], stems: list[str], folder_rows: dict[str, dict]) -> None:
    for r, stem in zip(rows, stems, strict=True):
        ref = folder_rows[stem]
        assert r["error"] is None, r["error"]
        assert r["top5"] == ref["top5"]
        np.testing.assert_allclose(r["probs"], ref["probs"], atol=1e-6)


@pytest.mark.e2e
def test_a_csv_manifest_over_a_folder(tmp_path, image_dir, photos, folder_rows, tiny_model_path):
    """Relative, absolute and file:// entries; ids from --id-column, class names as labels
    (labels.json as a folder's); an unreachable file and one that is not an image are error
    rows naming the entry, between good ones, and the job goes on."""
    shutil.copytree(image_dir, tmp_path / "imgs")
    (tmp_path / "imgs" / "notes.jpg").write_text("a text file named like a photo\n")
    lines = ["uid,where,kind"]
    for i, (rel, cls) in enumerate(photos):
        entry = (f"imgs/{rel}", str(tmp_path / "imgs" / rel),
                 (tmp_path / "imgs" / rel).as_uri())[i % 3]
        lines.append(f"p{i:03d},{entry},{cls}")
        if i == 10:
            lines.append("gone,imgs/missing.jpg,class_001")
        if i == 20:
            lines.append("text,imgs/notes.jpg,")
    (tmp_path / "work.csv").write_text("\n".join(lines) + "\n")
    store = Store(str(tmp_path / "store"))
    spec = prepare_job(store, "csv", tiny_model_path, records=str(tmp_path / "work.csv"),
                       per_record=25, columns={"url": "where", "id": "uid", "label": "kind"})
    assert len(spec.records) == 3 and spec.classes  # 62 entries in records of 25
    assert json.loads(store.get_bytes("csv/labels.json")) == CLASSES
    run_local(store, spec, image_errors=2)
    rows = rows_of(store, "csv")
    ids = [f"p{i:03d}" for i in range(60)]
    ids[11:11] = ["gone"]
    ids[22:22] = ["text"]
    assert [r["id"] for r in rows] == ids
    errors = {r["id"]: r for r in rows if r["error"]}
    assert errors.keys() == {"gone", "text"}
    assert errors["gone"]["error"]["message"] == (
        f"cannot fetch {tmp_path / 'imgs' / 'missing.jpg'}: no such file or object")
    assert errors["gone"]["filename"] == "imgs/missing.jpg"
    assert errors["gone"]["label"] == CLASSES.index("class_001")
    assert errors["text"]["filename"] == "imgs/notes.jpg"
    assert errors["text"]["error"]["message"] == (
        f"not an image (unrecognised format), at {tmp_path / 'imgs' / 'notes.jpg'}")
    assert errors["text"]["label"] is None
    good = [r for r in rows if not r["error"]]
    assert [r["label"] for r in good] == [CLASSES.index(c) for _, c in photos]
    assert [r["class_name"] for r in good] == [c for _, c in photos]
    assert good[1]["filename"] == str(tmp_path / "imgs" / photos[1][0])
    _same_scores(good, [Path(rel).stem for rel, _ in photos], folder_rows)


@pytest.mark.e2e
def test_a_jsonl_manifest_through_the_cli(tmp_path, image_dir, photos, folder_rows,
                                          tiny_model_path):
    """The command a user types: ids are the entries' indices, integer labels as they are
    (a negative one is no label), the location column found by its name."""
    entries = [{"image_url": str(image_dir / rel), "y": int(cls[-1])} for rel, cls in photos]
    entries[5]["y"] = -1
    entries.insert(7, {"image_url": "http://127.0.0.1:9/x.jpg", "y": 1})  # nothing listens
    text = "\n".join(json.dumps(e) for e in entries) + "\n\n"  # a blank line is no entry
    (tmp_path / "list.jsonl").write_text(text)
    store = tmp_path / "store"
    proc = run_cli("run", "--job", "jl", "--input", str(tmp_path / "list.jsonl"),
                   "--label-column", "y", "--model", tiny_model_path, "--store", str(store),
                   "--per-record", "40")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err  # the job ran whole; an image failed, so says the status
    assert "fetching 61 images of" in err
    assert "http://127.0.0.1:9/x.jpg: cannot fetch http://127.0.0.1:9/x.jpg: " in err
    rows = rows_of(Store(str(store)), "jl")
    assert [r["id"] for r in rows] == list(range(61))
    bad = rows[7]
    assert bad["filename"] == "http://127.0.0.1:9/x.jpg" and bad["label"] == 1
    assert bad["error"]["message"].startswith("cannot fetch http://127.0.0.1:9/x.jpg: ")
    assert "Cannot connect to host 127.0.0.1:9" in bad["error"]["message"]
    del rows[7]
    labels = [int(c[-1]) for _, c in photos]
    labels[5] = None
    assert [r["label"] for r in rows] == labels
    assert not Store(str(store)).exists("jl/labels.json")
    _same_scores(rows, [Path(rel).stem for rel, _ in photos], folder_rows)


@pytest.mark.e2e
def test_a_manifest_on_s3(tmp_path, s3_server, image_dir, photos, folder_rows, tiny_model_path):
    """A manifest in a bucket naming keys relative to it and s3:// URLs, fetched with the
    store options; a missing key is an error row naming it."""
    client = s3_server.client()
    keys = []
    for rel, _ in photos[:30]:
        key = f"manifest-imgs/{rel}"
        client.put_object(Bucket=s3_server.bucket, Key=key, Body=(image_dir / rel).read_bytes())
        keys.append(key)
    lines = ["key,label"] + [
        (f"{rel},{cls}" if i % 2 else f"{s3_server.url(k)},{cls}")
        for i, ((rel, cls), k) in enumerate(zip(photos[:30], keys, strict=True))]
    lines.insert(4, f"{s3_server.url('manifest-imgs/absent.jpg')},class_000")
    client.put_object(Bucket=s3_server.bucket, Key="manifest-imgs/m.csv",
                      Body=("\n".join(lines) + "\n").encode())
    store = Store(str(tmp_path / "store"))
    spec = prepare_job(store, "s3m", tiny_model_path, records=s3_server.url("manifest-imgs/m.csv"),
                       input_options=s3_server.options())
    run_local(store, spec, image_errors=1)
    rows = rows_of(store, "s3m")
    assert [r["id"] for r in rows] == list(range(31))
    absent = rows.pop(3)
    assert absent["filename"] == s3_server.url("manifest-imgs/absent.jpg")
    assert absent["error"]["message"] == (
        f"cannot fetch {s3_server.url('manifest-imgs/absent.jpg')}: no such file or object")
    assert [r["class_name"] for r in rows] == [c for _, c in photos[:30]]
    assert rows[1]["filename"] == photos[1][0]  # as the manifest names it
    _same_scores(rows, [Path(rel).stem for rel, _ in photos[:30]], folder_rows)


def _refused(tmp_path: Path, tiny_model_path: str, name: str, text: str, match: str,
             **columns: str) -> None:
    manifest = tmp_path / name
    manifest.write_text(text)
    store = Store(str(tmp_path / "store"))
    with pytest.raises(JobError, match=match):
        prepare_job(store, "bad", tiny_model_path, records=str(manifest), columns=columns)
    assert not (tmp_path / "store" / "bad").exists()


def test_bad_manifests_are_refused_before_anything_is_written(tmp_path, tiny_model_path):
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8\xff")
    _refused(tmp_path, tiny_model_path, "m.csv", "file,label\na.jpg,1\n",
             r"m\.csv: give --url-column: no column is named url, uri, path, key, s3_uri or "
             r"image_url; it has file, label")
    _refused(tmp_path, tiny_model_path, "m.csv", "url,path\na.jpg,a.jpg\n",
             r"several columns could hold the locations \(url, path\)")
    _refused(tmp_path, tiny_model_path, "m.csv", "url,label\na.jpg,1\n",
             r"no column 'uid' \(--id-column\); it has url, label", id="uid")
    _refused(tmp_path, tiny_model_path, "m.csv", "url,label\na.jpg,1\n",
             r"no column 'file' \(--url-column\)", url="file")
    _refused(tmp_path, tiny_model_path, "m.csv", "url,label\n",
             r"m\.csv: an empty manifest \(no entries\)")
    _refused(tmp_path, tiny_model_path, "m.csv", "url,label\na.jpg,1\na.jpg,1,extra\n",
             r"m\.csv: line 3 has 3 fields, the header 2")
    _refused(tmp_path, tiny_model_path, "m.csv", "url,uid\na.jpg,x\na.jpg,\n",
             r"line 3: no id in column 'uid'", id="uid")
    _refused(tmp_path, tiny_model_path, "m.csv", "url,uid\na.jpg,x\nb.jpg,y\na.jpg,x\n",
             r"m\.csv: line 4: id 'x' in column 'uid' is also on line 2; an id joins an "
             r"image's results back, so each must be unique", id="uid")
    _refused(tmp_path, tiny_model_path, "m.jsonl",
             '{"url": "a.jpg", "uid": 7}\n{"url": "a.jpg", "uid": "7"}\n'
             '{"url": "b.jpg", "uid": 7}\n',  # 7 and "7" are two ids, as they are written
             r"m\.jsonl: line 3: id 7 in column 'uid' is also on line 1", id="uid")
    _refused(tmp_path, tiny_model_path, "m.jsonl", '{"url": "a.jpg"}\n{"url": "a.jpg",}\n',
             r"m\.jsonl: line 2 is not JSON")
    _refused(tmp_path, tiny_model_path, "m.jsonl", '{"url": "a.jpg"}\n\n["a.jpg"]\n',
             r"m\.jsonl: line 3 is not a JSON object but a list")
    _refused(tmp_path, tiny_model_path, "m.jsonl", '{"url": "a.jpg", "label": [1]}\n',
             r"line 1: label \[1\] in column 'label' is neither an integer nor a class name")
    _refused(tmp_path, tiny_model_path, "m.jsonl", '{"url": "a.jpg"}\n{"url": 3}\n',
             r"line 2: column 'url' holds 3, not a URL or path")
    _refused(tmp_path, tiny_model_path, "m.jsonl", '{"url": "a.jpg"}\n',
             r"--image-column is for Parquet tables", image="url")
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(SourceError, match=r"empty\.csv: an empty manifest \(0 bytes\)"):
        scan_inputs(str(tmp_path / "empty.csv"))


def test_url_column_is_for_manifests_and_manifests_in_folders_are_skipped(
        tmp_path, tiny_model_path):
    """A manifest is read when it is the input; in a folder of images it is metadata, said
    as skipped; --url-column on anything else is refused, not ignored."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 20)
    (tmp_path / "in" / "meta.csv").write_text("url\na.jpg\n")
    inputs = scan_inputs(str(tmp_path / "in"))
    assert inputs.manifest is None and len(inputs.images) == 1
    assert inputs.skipped == [(str(tmp_path / "in" / "meta.csv"),
                               "a manifest (CSV or JSONL) is read when given alone as --input")]
    with pytest.raises(JobError, match=r"--url-column is for a manifest"):
        prepare_job(Store(str(tmp_path / "store")), "j", tiny_model_path,
                    records=str(tmp_path / "in"), columns={"url": "url"})
    # by content when the name says nothing: a JSON object per line, else CSV text
    (tmp_path / "list").write_text('{"uri": "in/a.jpg", "label": "cat"}\n')
    found = scan_inputs(str(tmp_path / "list"))
    assert found.manifest_kind == "jsonl"
    cols = check_manifest(found.manifest, found.manifest_kind)
    assert (cols.url, cols.label, cols.classes, cols.entries) == ("uri", "label", ("cat",), 1)


def test_the_cli_refuses_a_manifest_without_a_location_column(tmp_path, tiny_model_path):
    (tmp_path / "m.csv").write_text("name,label\na.jpg,1\n")
    store = tmp_path / "store"
    proc = run_cli("run", "--input", str(tmp_path / "m.csv"), "--model", tiny_model_path,
                   "--store", str(store))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "give --url-column" in err and "Traceback" not in err
    assert snapshot(store) == {}


def test_entries_are_fetched_in_parallel_a_bounded_window_ahead_in_order(tmp_path,
                                                                         monkeypatch):
    """Fetches overlap (up to `threads`), finish in any order, and come out in the
    manifest's order, never more than a bounded window ahead of the packer."""
    import threading
    import time

    from serveless.data import manifest as m

    n, threads = 200, 4
    (tmp_path / "m.csv").write_text("url\n" + "".join(f"e{i}.jpg\n" for i in range(n)))
    lock = threading.Lock()
    state = {"active": 0, "peak": 0, "fetched": 0}

    def fetch(url: str, options: dict) -> bytes:
        with lock:
            state["active"] += 1
            state["peak"] = max(state["peak"], state["active"])
        time.sleep((hash(url) % 5) / 1000)  # finish out of order
        with lock:
            state["active"] -= 1
            state["fetched"] += 1
        return b"\xff\xd8\xff" + url.encode()

    monkeypatch.setattr(m, "_fetch", fetch)
    found = scan_inputs(str(tmp_path / "m.csv"))
    cols = check_manifest(found.manifest, found.manifest_kind)
    done: list[int] = []
    seen = []
    for ex in m.manifest_examples(found.manifest, cols, progress=done.append,
                                  threads=threads):
        assert state["fetched"] - len(seen) <= threads * (m.FETCH_AHEAD + 1)
        seen.append(ex)
    assert [bytes(e.encoded)[3:].decode() for e in seen] == [
        str(tmp_path / f"e{i}.jpg") for i in range(n)]
    assert [e.id for e in seen] == list(range(n)) and done == [1] * n
    assert 2 <= state["peak"] <= threads
