"""Audit inputs and outputs shared by the audit tests: demo sample sets (hostile or with bad
images), configs, and the comparison of two audit folders."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from xmllm.explainers.demo.samples import generate_samples, sample_record

HOSTILE = "<script>alert(1)</script></script><img src=x onerror=alert(2)> \"dq\" 'sq' & \x1b[31m\x07 end"
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def write_set(folder: Path, n: int, seed: int = 0, hostile: bool = False, bad_images: bool = False) -> Path:
    """A JSONL set of ``n`` demo samples; with ``hostile`` the first one's id, question, answer and
    file name carry markup, quotes and control characters; with ``bad_images`` five more samples
    hold a truncated PNG, a decompression bomb, a CMYK JPEG, a 16-bit PNG and a palette PNG."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for k, s in enumerate(generate_samples(n, seed)):
        name = f"images/{s.id}.png"
        rec = sample_record(s, name, "")
        rec.pop("mask")
        if hostile and k == 0:
            name = "images/<u>x&amp;\"q'\x1b.png"
            rec.update(id=HOSTILE + " id", question=HOSTILE + " " + s.text, answer=HOSTILE, image=name)
        s.image().save(folder / name)
        lines.append(rec)
    if bad_images:
        first = generate_samples(1, seed)[0]
        good = first.image()
        buf = folder / "images/full.png"
        good.save(buf)
        data = buf.read_bytes()
        (folder / "images/truncated.png").write_bytes(data[: len(data) // 2])
        Image.new("1", (7000, 6000)).save(folder / "images/bomb.png")  # 42 M pixels in a few kB
        good.convert("CMYK").save(folder / "images/cmyk.jpg")
        grey16 = (np.asarray(good.convert("L"), dtype=np.uint16) * 257)
        Image.fromarray(grey16).save(folder / "images/grey16.png")
        good.convert("P").save(folder / "images/palette.png")
        for stem, file in (("truncated", "truncated.png"), ("bomb", "bomb.png"), ("cmyk", "cmyk.jpg"),
                           ("grey16", "grey16.png"), ("palette", "palette.png")):
            lines.append({"id": f"bad-{stem}", "image": f"images/{file}", "question": first.text,
                          "answer": first.answer})
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    return folder / "samples.jsonl"


def write_config(path: Path, model: Path, samples: str | dict = "set/samples.jsonl", **extra: object) -> Path:
    data = {
        "name": "test audit",
        "model": str(model),
        "device": "cpu",
        "seed": 3,
        "samples": samples if isinstance(samples, dict) else {"type": "jsonl", "path": samples},
        "explainers": {"perturbation.occlusion": {"window": 2}},
        "faithfulness": {"steps": 2},
        "reports": False,
        "output": "out",
        **extra,
    }
    path.write_text(json.dumps(data), encoding="utf-8")  # JSON is YAML
    return path


def strip_time(text: str) -> str:
    return TIMESTAMP.sub("T", text)



def compare_outputs(a: Path, b: Path) -> None:
    """Every file of two audit folders equal (arrays exactly), timestamps aside; run.json and
    timings.json hold seconds and are left out."""
    from xmllm.report.explained import load_run

    skip = {"run.json", "timings.json", ".xmllm-audit"}
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name not in skip)
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name not in skip)
    assert files_a == files_b
    for rel in files_a:
        if rel.suffix == ".npz":
            with np.load(a / rel) as x, np.load(b / rel) as y:
                assert x.files == y.files
                for key in x.files:
                    np.testing.assert_array_equal(x[key], y[key], err_msg=f"{rel}: {key}")
        elif rel.suffix in (".json", ".html", ".md"):
            ta, tb = (a / rel).read_text(encoding="utf-8"), (b / rel).read_text(encoding="utf-8")
            assert strip_time(ta) == strip_time(tb), rel
        else:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    runs = sorted({p.parent for p in a.rglob("manifest.json")})
    assert runs and all(load_run(r).explanations for r in runs)
