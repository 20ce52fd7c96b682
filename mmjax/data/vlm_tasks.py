"""Instruction-tuning tasks generated from the bundled sources' records: (instruction, answer).

Every task is plain text (the answer is what the loss scores, LLaVA Sec. 4.2):
  caption    "describe the image."                       -> the record's caption
  vqa        "what colour is the circle?"                -> "red"        (shapes)
             "what digit is this?"                       -> "seven"      (digits)
  refer      "find <ref>the red circle</ref>"            -> "<box>(x0,y0),(x1,y1)</box>"
  grounding  "describe the image with boxes."            -> "<ref>a red circle</ref><box>...</box>
                                                             left of <ref>...</ref><box>...</box>"
  identify   "what is in <box>(x0,y0),(x1,y1)</box>?"    -> "a red circle"
Boxes are Qwen-VL's (Bai et al., 2023, Sec. 2.2): corners normalised to integers in [0, 1000).
With task identifiers on, MiniGPT-v2's token for the task (Chen et al., 2023, Sec. 3) leads
the instruction: "[vqa] what colour is the circle?".

Questions are asked only when the scene answers them unambiguously ("what colour is the
circle?" only with exactly one circle); relations come from the boxes, not the caption.
`task_pairs` enumerates every pair of a task for a record (for evals, tokenizer training and
fit checks); `sample_pair` draws one with a seeded generator, as the pipeline does per visit.
"""

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmjax.data.sources import DIGIT_NAMES, SHAPE_RELATIONS, Source
from mmjax.errors import UserError

Record = Mapping[str, Any]
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels, end exclusive

TASKS = ("caption", "vqa", "refer", "grounding", "identify")
# MiniGPT-v2's task identifier tokens (Chen et al., 2023, Sec. 3 / Table 1)
TASK_IDENTIFIERS = {
    "caption": "[caption]",
    "vqa": "[vqa]",
    "refer": "[refer]",
    "grounding": "[grounding]",
    "identify": "[identify]",
}
IMAGE_TOKEN = "<image>"
REF_OPEN, REF_CLOSE, BOX_OPEN, BOX_CLOSE = "<ref>", "</ref>", "<box>", "</box>"
# Every special a VLM sequence holds; the tokenizer gives each one id (tokenizer.py)
SPECIAL_TOKENS = (
    IMAGE_TOKEN,
    REF_OPEN,
    REF_CLOSE,
    BOX_OPEN,
    BOX_CLOSE,
    *TASK_IDENTIFIERS.values(),
)
BOX_BINS = 1000  # Qwen-VL: integer coordinates in [0, 1000)

CAPTION_PROMPTS = ("describe the image.", "write a short caption for the image.")
GROUNDING_PROMPT = "describe the image with boxes."
DIGIT_QUESTION = "what digit is this?"
# The inverse of each relation: "A left of B" iff "B right of A"
INVERSE_RELATION = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}


@dataclasses.dataclass(frozen=True)
class TaskPair:
    """One instruction and its answer; `kind` names the question type inside a task."""

    task: str
    kind: str
    instruction: str
    answer: str

    def prompt(self, task_identifiers: bool) -> str:
        """The instruction as the model reads it, led by the task's identifier when asked."""
        if not task_identifiers:
            return self.instruction
        return f"{TASK_IDENTIFIERS[self.task]} {self.instruction}"


# ------------------------------------------------------------------------------------ boxes


def normalise_coordinate(value: float, size: int) -> int:
    """A pixel coordinate in [0, size] as an integer bin in [0, BOX_BINS)."""
    return min(int(value * BOX_BINS // size), BOX_BINS - 1)


def box_text(bbox: Sequence[float], width: int, height: int) -> str:
    """`<box>(x0,y0),(x1,y1)</box>` of a pixel box in an image of `width` x `height`."""
    x0, y0, x1, y1 = bbox
    a = (normalise_coordinate(x0, width), normalise_coordinate(y0, height))
    b = (normalise_coordinate(x1, width), normalise_coordinate(y1, height))
    return f"{BOX_OPEN}({a[0]},{a[1]}),({b[0]},{b[1]}){BOX_CLOSE}"


_NUMBER = r"\s*(\d+)\s*"
_BOX = rf"{re.escape(BOX_OPEN)}\s*\({_NUMBER},{_NUMBER}\)\s*,\s*\({_NUMBER},{_NUMBER}\)\s*"
_BOX += re.escape(BOX_CLOSE)
_GROUNDED = re.compile(rf"(?:{re.escape(REF_OPEN)}(.*?){re.escape(REF_CLOSE)}\s*)?{_BOX}")


@dataclasses.dataclass(frozen=True)
class GroundedBox:
    """A box parsed from text, with the `<ref>` phrase right before it (None without one)."""

    ref: str | None
    box: Box


def parse_boxes(text: str, width: int, height: int) -> list[GroundedBox]:
    """Every `[<ref>phrase</ref>]<box>(x0,y0),(x1,y1)</box>` in `text`, as pixel boxes of a
    `width` x `height` image (whitespace between the parts is tolerated, as decoders add it)."""
    out = []
    for m in _GROUNDED.finditer(text):
        x0, y0, x1, y1 = (int(v) for v in m.groups()[1:])
        box = (x0 * width / BOX_BINS, y0 * height / BOX_BINS)
        box += (x1 * width / BOX_BINS, y1 * height / BOX_BINS)
        ref = m.group(1).strip() if m.group(1) is not None else None
        out.append(GroundedBox(ref, box))
    return out


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [x0, y0, x1, y1] boxes; 0 when the union is empty."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


# ----------------------------------------------------------------------------------- scenes


def object_name(obj: Mapping[str, Any]) -> str:
    """A shape's name as the captions say it: "a red circle"."""
    return f"a {obj['colour']} {obj['shape']}"


def relation_holds(relation: str, a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether box `a` is `relation` box `b`, with no overlap along the relation's axis."""
    if relation == "left of":
        return a[2] <= b[0]
    if relation == "right of":
        return a[0] >= b[2]
    if relation == "above":
        return a[3] <= b[1]
    if relation == "below":
        return a[1] >= b[3]
    raise ValueError(f"unknown relation {relation!r}; valid: {SHAPE_RELATIONS}")


def _unique(objects: Sequence[Mapping[str, Any]], key: str, value: str) -> bool:
    return sum(o[key] == value for o in objects) == 1


def _shape_questions(objects: Sequence[Mapping[str, Any]]) -> list[TaskPair]:
    """VQA on a shapes scene: every question whose answer the scene fixes."""
    pairs = []
    for obj in objects:
        if _unique(objects, "shape", obj["shape"]):
            q = f"what colour is the {obj['shape']}?"
            pairs.append(TaskPair("vqa", "colour", q, obj["colour"]))
        if _unique(objects, "colour", obj["colour"]):
            q = f"what shape is the {obj['colour']} object?"
            pairs.append(TaskPair("vqa", "shape", q, obj["shape"]))
    pairs.append(TaskPair("vqa", "count", "how many shapes are there?", DIGIT_NAMES[len(objects)]))
    for anchor in objects:  # "the colour shape" always names one object: classes are distinct
        for relation in SHAPE_RELATIONS:
            hits = [
                o
                for o in objects
                if o is not anchor and relation_holds(relation, o["bbox"], anchor["bbox"])
            ]
            if len(hits) == 1:
                q = f"what is {relation} the {anchor['colour']} {anchor['shape']}?"
                pairs.append(TaskPair("vqa", "relation", q, object_name(hits[0])))
    return pairs


def _referring_expressions(objects: Sequence[Mapping[str, Any]], obj: Mapping[str, Any]):
    """Phrases that pick `obj` alone out of the scene."""
    phrases = [f"the {obj['colour']} {obj['shape']}"]
    if _unique(objects, "shape", obj["shape"]):
        phrases.append(f"the {obj['shape']}")
    if _unique(objects, "colour", obj["colour"]):
        phrases.append(f"the {obj['colour']} shape")
    return phrases


def _grounded_caption(caption: str, objects: Sequence[Mapping[str, Any]], size) -> str | None:
    """The caption with each object's name wrapped as `<ref>name</ref><box>...</box>`; None
    when some object is not named in the caption."""
    out = caption
    for obj in objects:
        name = object_name(obj)
        if name not in out:
            return None
        out = out.replace(name, f"{REF_OPEN}{name}{REF_CLOSE}{box_text(obj['bbox'], *size)}", 1)
    return out


def _image_size(record: Record) -> tuple[int, int]:
    """(width, height) of the record's image: the frame its boxes are normalised in."""
    height, width = np.asarray(record["image"]).shape[:2]
    return width, height


def task_pairs(record: Record, task: str, source: str) -> list[TaskPair]:
    """Every (instruction, answer) of `task` for `record` of data source `source`; empty
    when the record does not support the task (boxes need the shapes' scene metadata)."""
    if task not in TASKS:
        raise UserError(f"unknown VLM task {task!r}; valid: {TASKS}")
    if task == "caption":
        return [TaskPair(task, "caption", p, record["caption"]) for p in CAPTION_PROMPTS]
    if task == "vqa" and source == "digits":
        return [TaskPair(task, "digit", DIGIT_QUESTION, DIGIT_NAMES[int(record["label"])])]
    objects = record.get("shapes") if source == "shapes" else None
    if not objects:
        return []
    if task == "vqa":
        return _shape_questions(objects)
    size = _image_size(record)
    if task == "grounding":
        answer = _grounded_caption(record["caption"], objects, size)
        return [] if answer is None else [TaskPair(task, "grounding", GROUNDING_PROMPT, answer)]
    pairs = []
    for obj in objects:
        box = box_text(obj["bbox"], *size)
        if task == "refer":
            for phrase in _referring_expressions(objects, obj):
                pairs.append(TaskPair(task, "refer", f"find {REF_OPEN}{phrase}{REF_CLOSE}", box))
        else:
            pairs.append(TaskPair(task, "identify", f"what is in {box}?", object_name(obj)))
    return pairs


def sample_pair(
    record: Record, source: str, weights: Mapping[str, float], rng: np.random.Generator
) -> TaskPair:
    """One pair: a task drawn by `weights` among those the record supports, then a question
    kind uniformly (so plentiful kinds do not crowd out the rest), then one of its pairs."""
    options = {t: task_pairs(record, t, source) for t, w in weights.items() if w > 0}
    options = {t: pairs for t, pairs in options.items() if pairs}
    if not options:
        positive = sorted(t for t, w in weights.items() if w > 0)
        raise UserError(
            f"record {record.get('index')} of data.source {source!r} supports none of the "
            f"tasks {positive} weighted in data.sequence.tasks (boxes and shape questions need "
            "data.source 'shapes'; digit questions 'digits')"
        )
    names = list(options)
    p = np.asarray([weights[t] for t in names], np.float64)
    pairs = options[names[rng.choice(len(names), p=p / p.sum())]]
    kinds = sorted({pair.kind for pair in pairs})
    kind = kinds[rng.integers(len(kinds))]
    pairs = [pair for pair in pairs if pair.kind == kind]
    return pairs[rng.integers(len(pairs))]


def check_task_weights(weights: Mapping[str, Any]) -> dict[str, float]:
    """`data.sequence.tasks` as {task: weight}: known tasks, finite weights >= 0, one > 0."""
    unknown = sorted(set(weights) - set(TASKS))
    if unknown:
        raise UserError(f"unknown tasks {unknown} in data.sequence.tasks; valid: {TASKS}")
    out = {}
    for task, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise UserError(f"data.sequence.tasks.{task} must be a number, got {weight!r}")
        if not math.isfinite(weight) or weight < 0:
            raise UserError(f"data.sequence.tasks.{task} must be finite and >= 0, got {weight}")
        out[task] = float(weight)
    if not any(w > 0 for w in out.values()):
        raise UserError(f"data.sequence.tasks {out} gives no task a positive weight")
    return out


def caption_variants(record: Record) -> list[Record]:
    """`record` once per caption in its `captions` (the pipeline draws one per visit)."""
    captions = record.get("captions") or [record["caption"]]
    return [{**record, "caption": caption} for caption in captions]


def strip_specials(text: str) -> str:
    """`text` with every special token replaced by a space: what a base tokenizer reads."""
    for token in SPECIAL_TOKENS:
        text = text.replace(token, " ")
    return text


def task_texts(source: Source, source_name: str, max_records: int) -> list[str]:
    """Instructions and answers of every task for up to `max_records` records evenly spaced
    over `source`, specials stripped: the text a VLM's tokenizer is trained on."""
    step = max(1, math.ceil(len(source) / max_records))
    texts = []
    for index in range(0, len(source), step):
        for record in caption_variants(source[index]):
            for task in TASKS:
                for pair in task_pairs(record, task, source_name):
                    texts += [strip_specials(pair.instruction), strip_specials(pair.answer)]
    return texts
