"""Audits over samples with several pictures or a video (#25 items 1, 3 and 6): the JSONL and CSV
forms, each picture's share, the flag for an answer carried by another picture than the evidence's,
and one-line errors for malformed records; real forwards of the random demo model."""
from __future__ import annotations

import os

import json

import av
import numpy as np
import pytest
from audit_sets import write_config

from xmllm import XmllmError
from xmllm.audit import load_config, run_audit
from xmllm.explainers.demo.samples import generate_samples
from xmllm.explainers.metrics.image_shares import image_shares
from xmllm.report.explained import load_run
from xmllm.samples import read_sample_set

EXPLAINERS = {"relevancy.chefer": {}, "gradient.saliency": {}}

LONG_CHECKS = os.environ.get("XMLLM_LONG_CHECKS") == "1"
long_check = pytest.mark.skipif(not LONG_CHECKS, reason="a long check: .ci/run runs it as its own step (XMLLM_LONG_CHECKS=1)")



def write_clip(path, pictures) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=2)
        stream.width, stream.height, stream.pix_fmt = 128, 128, "yuv420p"
        for picture in pictures:
            frame = av.VideoFrame.from_ndarray(np.asarray(picture.convert("RGB").resize((128, 128))), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def picture_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    (root / "set").mkdir()
    samples = generate_samples(4, 2)
    for s in samples:
        s.image().save(root / "set" / f"{s.id}.png")
    write_clip(root / "set" / "clip.mp4", [s.image() for s in samples])
    records = [
        {"id": "pair-1", "image": [f"{samples[0].id}.png", f"{samples[1].id}.png"], "question": samples[1].text,
         "answer": samples[1].answer, "evidence_image": 2},
        {"id": "pair-2", "image": [f"{samples[2].id}.png", f"{samples[3].id}.png"], "question": samples[2].text,
         "answer": samples[2].answer, "evidence_image": 1},
        {"id": "clip", "video": "clip.mp4", "frames": 2, "question": samples[0].text, "answer": samples[0].answer},
    ]
    (root / "set" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return root, samples


@pytest.mark.slow
@long_check
def test_an_audit_over_pictures_and_a_video(picture_set, model):
    root, _ = picture_set
    cfg = write_config(root / "c.yaml", model, explainers=EXPLAINERS, checks=[], faithfulness={"enabled": False},
                       reports=True)
    outcome = run_audit(load_config(cfg), progress=False)
    summary = json.loads((outcome.out / "audit.json").read_text())
    rows = {r["id"]: r for r in summary["samples"]}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    flagged = 0
    for sid in ("pair-1", "pair-2"):
        row = rows[sid]
        assert row["pictures"] == 2 and set(row["carried_by"]) == set(EXPLAINERS)
        run = load_run(outcome.out / "samples" / row["key"] / "run")
        assert len(run.images) == 2
        carriers = []
        for eid, said in row["carried_by"].items():  # the recorded carrier is the saved maps' own
            shares = image_shares(run[eid], run.manifest["layouts"], 2)
            assert said["image"] == shares.carrier + 1 and said["share"] == pytest.approx(max(shares.shares), abs=1e-4)
            carriers.append(said["image"])
        top = max(sorted(set(carriers)), key=carriers.count)
        unexpected = any(f["kind"] == "unexpected_image" for f in row["flags"])
        assert unexpected == (top != row["evidence_image"])
        flagged += unexpected
    assert summary["flag_counts"]["unexpected_image"] == flagged
    clip = load_run(outcome.out / "samples" / rows["clip"]["key"] / "run")
    assert [f["index"] for f in clip.manifest["video"]["frames"]] == [1, 3] and len(clip.images) == 2
    assert clip.manifest["video"]["path"].endswith("clip.mp4")


@pytest.mark.slow
@long_check
def test_the_csv_form_takes_joined_images_and_a_video_column(picture_set, model, tmp_path):
    root, samples = picture_set
    rows = ["image,video,frames,question,answer,id,evidence_image",
            f"{samples[0].id}.png|{samples[1].id}.png,,,\"{samples[1].text}\",{samples[1].answer},two,2",
            f",clip.mp4,2,\"{samples[0].text}\",{samples[0].answer},clip,"]
    (root / "set" / "q.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    cfg = write_config(tmp_path / "c.yaml", model, samples={"type": "image_folder", "folder": str(root / "set"),
                       "csv": str(root / "set" / "q.csv")}, explainers=EXPLAINERS, checks=[],
                       faithfulness={"enabled": False}, allow_absolute_paths=True)
    outcome = run_audit(load_config(cfg), progress=False)
    summary = json.loads((outcome.out / "audit.json").read_text())
    by_id = {r["id"]: r for r in summary["samples"]}
    assert by_id["two"]["status"] == "ok" and by_id["two"]["pictures"] == 2 and by_id["two"]["evidence_image"] == 2
    assert by_id["clip"]["status"] == "ok" and by_id["clip"]["pictures"] == "video"


@pytest.mark.parametrize("record, said", [
    ({"id": "a", "image": "x.png", "video": "c.mp4", "question": "q"}, "one of them"),
    ({"id": "a", "question": "q"}, "one of them"),
    ({"id": "a", "image": [], "question": "q"}, "field 'image'"),
    ({"id": "a", "image": ["x.png", 3], "question": "q"}, "field 'image'"),
    ({"id": "a", "image": ["x.png"], "question": "q", "evidence_image": 2}, "field 'evidence_image'"),
    ({"id": "a", "video": "c.mp4", "question": "q", "frames": 0}, "field 'frames'"),
    ({"id": "a", "image": "x.png", "question": "q", "frames": 2}, "field 'frames' applies to a 'video'"),
])
def test_malformed_picture_fields_are_one_line_naming_the_line(tmp_path, record, said):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(XmllmError) as err:
        read_sample_set(path)
    assert f"{path}:1:" in str(err.value) and said in str(err.value) and "\n" not in str(err.value)


def test_a_missing_second_picture_fails_that_sample_alone(picture_set, model, tmp_path):
    root, samples = picture_set
    (tmp_path / "set").mkdir()
    samples[0].image().save(tmp_path / "set" / "a.png")
    records = [{"id": "ok", "image": "a.png", "question": samples[0].text},
               {"id": "gone", "image": ["a.png", "missing.png"], "question": samples[0].text}]
    (tmp_path / "set" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    cfg = write_config(tmp_path / "c.yaml", model, explainers=EXPLAINERS, checks=[], faithfulness={"enabled": False})
    outcome = run_audit(load_config(cfg), progress=False)
    rows = {r["id"]: r for r in json.loads((outcome.out / "audit.json").read_text())["samples"]}
    assert rows["ok"]["status"] == "ok" and rows["gone"]["status"] == "failed"
    assert "missing.png" in rows["gone"]["error"] and "\n" not in rows["gone"]["error"]
