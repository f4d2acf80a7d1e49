"""``xmllm ask``: greedy answers from any supported model, for one image or a sample set."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from xmllm.errors import XmllmError
from .explain import add_dispatch_options, add_model_options, add_picture_options, dispatch_options, pictures


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ask", help="answer a question about an image (or every sample of a set)")
    p.add_argument("--model", default="demo", help="'demo', a local folder or a hub id (default demo)")
    add_picture_options(p)
    p.add_argument("--question", help="the question")
    p.add_argument("--samples", type=Path, help="a samples.jsonl sample set instead of --image/--question")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="the answer's token limit (default: the model's; answers cut there are marked)")
    add_model_options(p)
    add_dispatch_options(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    single = bool(args.image) or args.video is not None or args.question is not None
    if single == (args.samples is not None):
        raise XmllmError("give either --image (or --video) and --question, or --samples")
    if single and not (args.question or "").strip():
        raise XmllmError("--question: a non-empty question is required with --image or --video")

    from xmllm.explainers.answering import check_max_new_tokens, generate_answer, is_correct, unknown_words
    from xmllm.images import load_image
    from xmllm.explainers.models import load_model
    from xmllm.samples import read_sample_set

    check_max_new_tokens(args.max_new_tokens, "--max-new-tokens")
    placed = dispatch_options(args)

    if single:
        images, clip = pictures(args)
        if clip:
            frames = clip["video"].frames  # decoded once, by pictures()
        else:
            frames = [load_image(path) for path in args.image]
        items = [(None, frames, args.question, None)]
    else:
        items = [(r.id, r, r.question, r.answer) for r in read_sample_set(args.samples)]
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, **placed)
    rows = []
    for sid, image, question, expected in items:
        images = image.load_pictures() if hasattr(image, "load_pictures") else list(image)
        ans = generate_answer(loaded, images, question, args.max_new_tokens)
        row = {"id": sid, "question": question, "answer": ans.text, "tokens": list(ans.tokens),
               "probs": [round(p, 4) for p in ans.probs], "stopped": ans.stopped}
        unknown = unknown_words(loaded, question)
        if unknown:
            row["unknown_words"] = unknown
        if expected is not None:
            row["expected"] = expected
            row["correct"] = is_correct(ans.text, expected)
        rows.append(row)
    if args.json:
        print(json.dumps(rows if not single else rows[0], indent=2))
        return 0
    for row in rows:
        prob = " ".join(f"{t}:{p:.2f}" for t, p in zip(row["tokens"], row["probs"]))
        mark = "" if "correct" not in row else ("  [correct]" if row["correct"] else f"  [wrong: expected {row['expected']}]")
        prefix = f"{row['id']}: " if row["id"] else ""
        cut = "  [cut at --max-new-tokens; may go on]" if row["stopped"] == "length" else ""
        print(f"{prefix}{row['answer']}{mark}{cut}    ({prob})")
        if row.get("unknown_words"):
            print(f"xmllm: warning: {prefix}the tokenizer does not know "
                  f"{', '.join(map(repr, row['unknown_words']))} in the question", file=sys.stderr)
    scored = [r for r in rows if "correct" in r]
    if len(scored) > 1:
        print(f"accuracy: {sum(r['correct'] for r in scored)}/{len(scored)} = {sum(r['correct'] for r in scored) / len(scored):.1%}")
    return 0
