"""VQA v2 questions joined with their annotations (answers and the object ids a map is scored on)."""
from __future__ import annotations

from .coco import CocoData, Skip, read_json


def load_questions(questions: str, answers: str | None, data: CocoData) -> dict[int, list[dict]]:
    """{image_id: [question merged with its annotation]}; questions without an annotation or with
    an image the data set lacks are skipped and recorded in ``data.skipped``."""
    if not answers:
        raise ValueError("--questions needs --answers (the VQA annotations with object ids)")
    question_file = read_json(questions, "--questions")
    answer_file = read_json(answers, "--answers")
    if "questions" not in question_file or "annotations" not in answer_file:
        raise ValueError("--questions needs a 'questions' list and --answers an 'annotations' list (VQA v2)")
    by_id = {a.get("question_id"): a for a in answer_file["annotations"]}
    table: dict[int, list[dict]] = {}
    for q in question_file["questions"]:
        annotation = by_id.get(q.get("question_id"))
        if annotation is None or q.get("image_id") not in data.images:
            data.skipped.append(Skip("question", q.get("question_id"), "no annotation or unknown image"))
            continue
        table.setdefault(q["image_id"], []).append({**q, **annotation})
    return table
