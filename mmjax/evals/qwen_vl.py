"""Answers of a Qwen2-VL / Qwen2.5-VL (mmjax.models.qwen_vl) on held-out records, decoded
greedily at each image's or video's own size and scored.

The first `num_samples` records of `split` are asked the questions of the training tasks
(mmjax.data.qwen_tasks), laid out as the training rows lay out a prompt (the vision block,
then the instruction):

  refer    every object a record names unambiguously; the first box parsed from the answer
           (in the run's `box_format`, in the smart-resized frame the model sees) is compared
           with the true box: `grounding_miou` is the mean IoU (0 when no box parses),
           `grounding_accuracy` the rate of IoU >= 0.5 (RefCOCO's criterion). On scenes of two
           objects, `grounding_miou_distractors` is the mean IoU there and
           `grounding_wrong_object` the rate at which the box overlaps the other object more
           than the named one.
  caption  one caption prompt a record; `caption_accuracy` is the exact-match rate with the
           record's caption up to case and spaces.
  video    the motion question of a video; `video_accuracy` is the exact-match rate of the
           answer (stripped, lower case) with the record's direction.

Prompts are decoded in batches of `batch_size` (the last filled with repeats), every row's
patches packed to `data.sequence.patch_capacity` and prompts of similar length batched
together, left-padded to a multiple of LENGTH_BUCKET tokens, so the decoder compiles once per
bucket. `workdir/samples/<name>_<k>.txt` and `.png` hold the first `num_examples` answers of
each task at the k-th evaluation: refer draws the true box (green) and the answer's (orange) on
the resized image, video shows the first and last frames side by side.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from PIL import Image, ImageDraw

from mmjax.data import qwen_tasks
from mmjax.data.native_resolution import PlaceholderIds, VisionGeometry, Visual, smart_resize
from mmjax.data.sources import build_source
from mmjax.data.vlm_tasks import TaskPair, box_iou
from mmjax.errors import UserError
from mmjax.evals import generation
from mmjax.evals.features import EvalContext
from mmjax.evals.vlm import answer_in_batches
from mmjax.sampling.qwen_vl import prompt_batch
from mmjax.sampling.vlm import generate_batch

Record = Mapping[str, Any]
Box = qwen_tasks.Box
# task -> the metric it reports
TASK_METRICS = {
    "refer": "grounding_miou",
    "caption": "caption_accuracy",
    "video": "video_accuracy",
}
IOU_HIT = 0.5  # RefCOCO: a box is right at IoU >= 0.5
LENGTH_BUCKET = 32  # prompts are left-padded to a multiple of this many tokens
TILE = 160  # the largest side of a sample grid's cell, in pixels
TRUE_BOX, ANSWER_BOX = (40, 200, 60), (255, 140, 0)


def normalise(text: str) -> str:
    """Lower case, single spaces, no leading or trailing space."""
    return " ".join(text.lower().split())


def resized_size(record: Record, seq: ml_collections.ConfigDict) -> tuple[int, int]:
    """(height, width) of the record's image or frames after smart resize: the frame its
    boxes are answered in."""
    g = qwen_tasks.geometry(seq)
    return smart_resize(*qwen_tasks.record_size(record), g.factor, g.min_pixels, g.max_pixels)


def object_box(record: Record, index: int, seq: ml_collections.ConfigDict) -> Box:
    """The true box of the record's `index`-th object in its resized frame."""
    bbox = record["shapes"][index]["bbox"]
    return qwen_tasks.resized_box(bbox, qwen_tasks.record_size(record), resized_size(record, seq))


def named_object(record: Record, pair: TaskPair, seq: ml_collections.ConfigDict) -> int:
    """The index of the object a refer `pair` of `record` names (the one whose answer it is)."""
    resized = resized_size(record, seq)
    for i, obj in enumerate(record["shapes"]):
        answer = qwen_tasks.box_answer(
            object_box(record, i, seq), resized, qwen_tasks.object_label(obj), seq.box_format
        )
        if answer == pair.answer:
            return i
    raise ValueError(f"no object of record {record.get('index')} answers {pair.answer!r}")


def grounding(
    answer: str, record: Record, target: int, seq: ml_collections.ConfigDict
) -> tuple[float, float | None, Box | None]:
    """(IoU of the answer's first box with object `target`, the largest IoU with another
    object of the scene or None when it holds no other, the parsed box or None): IoUs are 0
    when no box parses."""
    box = qwen_tasks.parse_box(answer, resized_size(record, seq), seq.box_format)
    others = [i for i in range(len(record["shapes"])) if i != target]
    if box is None:
        return 0.0, (0.0 if others else None), None
    iou = box_iou(box, object_box(record, target, seq))
    other = max((box_iou(box, object_box(record, i, seq)) for i in others), default=None)
    return iou, other, box


def score_answer(
    answer: str, pair: TaskPair, record: Record, seq: ml_collections.ConfigDict
) -> float:
    """A decoded `answer` to `pair` about `record`: the IoU for refer, 1 or 0 otherwise."""
    if pair.task == "refer":
        return grounding(answer, record, named_object(record, pair, seq), seq)[0]
    if pair.task == "caption":
        return float(normalise(answer) == normalise(record["caption"]))
    if pair.task == "video":
        return float(answer.strip().lower() == str(record["direction"]).lower())
    raise UserError(f"the qwen_vl eval scores tasks {tuple(TASK_METRICS)}, not {pair.task!r}")


def grounding_metrics(
    answers: Sequence[str],
    records: Sequence[Record],
    targets: Sequence[int],
    seq: ml_collections.ConfigDict,
) -> dict[str, float]:
    """The refer metrics (module docstring) of answers about `targets` of `records`; the
    distractor metrics only where some scene holds two objects."""
    rows = [grounding(a, r, t, seq)[:2] for a, r, t in zip(answers, records, targets, strict=True)]
    ious = np.asarray([iou for iou, _ in rows], np.float64)
    out = {
        "grounding_miou": float(ious.mean()) if len(ious) else 0.0,
        "grounding_accuracy": float(np.mean(ious >= IOU_HIT)) if len(ious) else 0.0,
    }
    pairs = np.asarray([(iou, other) for iou, other in rows if other is not None])
    if len(pairs):
        out["grounding_miou_distractors"] = float(pairs[:, 0].mean())
        out["grounding_wrong_object"] = float(np.mean(pairs[:, 1] > pairs[:, 0]))
    return out


@dataclasses.dataclass(frozen=True)
class Question:
    """Record `record` (an index) asked `pair`; `target` the object a refer pair names."""

    record: int
    pair: TaskPair
    prompt_ids: tuple[int, ...]
    length: int  # the prompt's tokens with its visual's placeholder expanded
    target: int = -1


class QwenVlEval:
    """`evals.NAME = dict(type="qwen_vl", split, num_samples, batch_size, tasks,
    max_new_tokens=0, num_examples=8)`: `tasks` among TASK_METRICS (default: the run's
    training tasks); `max_new_tokens` 0 allows the longest reference answer and its <eos>."""

    def __init__(self, cfg: ml_collections.ConfigDict, ctx: EvalContext):
        seq = ctx.data_cfg.get("sequence") or {}
        if seq.get("kind") != "qwen_vl":
            raise UserError(
                f"evals.{cfg.name}: the qwen_vl eval needs data.sequence.kind 'qwen_vl', got "
                f"{seq.get('kind')!r}"
            )
        qwen_tasks.check_qwen_config(seq)
        self.cfg, self.ctx, self.seq = cfg, ctx, seq
        self.geometry: VisionGeometry = qwen_tasks.geometry(seq)
        ids = ctx.tokenizer.special_ids
        self.placeholders = PlaceholderIds(ids[qwen_tasks.IMAGE_PAD], ids[qwen_tasks.VIDEO_PAD])
        split = build_source(ctx.data_cfg, cfg.split)
        self.records = [split[i] for i in range(min(int(cfg.num_samples), len(split)))]
        self.visuals: list[Visual] = [qwen_tasks.visual(r, seq) for r in self.records]
        self.questions = self._questions(cfg.get("tasks"))
        tok = ctx.tokenizer
        references = [q.pair.answer for qs in self.questions.values() for q in qs]
        longest = max(len(tok.encode(text)) for text in references) + 1  # and <eos>
        self.max_new_tokens = int(cfg.get("max_new_tokens", 0) or 0) or longest
        # one decoder for every call: jit's cache is keyed on it, so later evals reuse the
        # compiled decoding
        self.decoder = ctx.model.clone(decode=True)
        self.step = 0

    def _questions(self, tasks: Sequence[str] | None) -> dict[str, list[Question]]:
        """{task: its questions}; a task asked for that no record supports is an error."""
        asked = tuple(tasks or ())
        unknown = sorted(set(asked) - set(TASK_METRICS))
        if unknown:
            raise UserError(
                f"evals.{self.cfg.name}.tasks {unknown} are unknown; valid: {tuple(TASK_METRICS)}"
            )
        if not asked:
            asked = tuple(t for t, w in self.seq.tasks.items() if float(w) > 0)
        out = {}
        for task in asked:
            questions = []
            for i, (record, vis) in enumerate(zip(self.records, self.visuals, strict=True)):
                pairs = qwen_tasks.task_pairs(record, task, self.seq)
                for pair in pairs[:1] if task == "caption" else pairs:
                    ids = qwen_tasks.prompt_ids(pair, self.ctx.tokenizer, vis.video)
                    length = len(ids) - 1 + self.geometry.tokens(vis.grid)
                    target = named_object(record, pair, self.seq) if task == "refer" else -1
                    questions.append(Question(i, pair, tuple(ids), length, target))
            if questions:
                out[task] = questions
            elif tasks:
                raise UserError(
                    f"evals.{self.cfg.name}: no record of {self.cfg.split!r} of data.source "
                    f"{self.ctx.data_cfg.source!r} supports the task {task!r} (refer needs "
                    "scenes with shapes, video needs videos)"
                )
        if not out:
            raise UserError(f"evals.{self.cfg.name}: no record supports the tasks {asked}")
        return out

    def _batch(self, questions: Sequence[Question]) -> dict[str, np.ndarray]:
        """The rows of `questions` left-padded to a multiple of LENGTH_BUCKET tokens, their
        patches packed to the run's patch capacity."""
        tok = self.ctx.tokenizer
        prompts = [(list(q.prompt_ids), [self.visuals[q.record]]) for q in questions]
        batch = prompt_batch(
            prompts,
            self.placeholders,
            self.geometry,
            pad_id=tok.pad_id,
            capacity=int(self.seq.patch_capacity),
        )
        length = batch["tokens"].shape[1]
        pad = -length % LENGTH_BUCKET
        if pad:
            batch["tokens"] = np.pad(
                batch["tokens"], ((0, 0), (pad, 0)), constant_values=tok.pad_id
            )
            batch["segment_ids"] = np.pad(batch["segment_ids"], ((0, 0), (pad, 0)))
            batch["positions"] = np.pad(batch["positions"], ((0, 0), (0, 0), (pad, 0)))
            batch["visual_positions"] = batch["visual_positions"] + pad
        return batch

    def answers(self, params: Any, questions: Sequence[Question]) -> list[str]:
        """Greedy answers to `questions` (evals/vlm.py `answer_in_batches`), prompts of
        similar length (placeholders expanded) batched together."""
        tok = self.ctx.tokenizer

        def decode(rows: list[int]) -> np.ndarray:
            return generate_batch(
                self.decoder,
                params,
                self._batch([questions[i] for i in rows]),
                eos_id=tok.eos_id,
                pad_id=tok.pad_id,
                max_new_tokens=self.max_new_tokens,
            )

        lengths = [q.length for q in questions]
        return answer_in_batches(lengths, int(self.cfg.batch_size), self.cfg.name, decode, tok)

    def __call__(self, params: Any) -> dict[str, float]:
        flat = [q for qs in self.questions.values() for q in qs]
        answers = self.answers(params, flat)
        metrics: dict[str, float] = {}
        examples, start = [], 0
        n = int(self.cfg.get("num_examples", 8))
        for task, questions in self.questions.items():
            task_answers = answers[start : start + len(questions)]
            start += len(questions)
            records = [self.records[q.record] for q in questions]
            if task == "refer":
                targets = [q.target for q in questions]
                metrics.update(grounding_metrics(task_answers, records, targets, self.seq))
                scores = [
                    grounding(a, r, t, self.seq)[0]
                    for a, r, t in zip(task_answers[:n], records, targets, strict=False)
                ]
            else:
                scores = [
                    score_answer(a, q.pair, r, self.seq)
                    for a, q, r in zip(task_answers, questions, records, strict=True)
                ]
                metrics[TASK_METRICS[task]] = float(np.mean(scores))
            examples += list(zip(questions[:n], task_answers[:n], scores[:n], strict=True))
        self._write_examples(examples)
        return metrics

    def _write_examples(self, examples: list[tuple[Question, str, float]]) -> None:
        """The text file and picture grid of the first answers of each task."""
        if self.ctx.workdir is None or jax.process_index() != 0 or not examples:
            return
        self.step += 1
        stem = generation.answers_stem(self.ctx.workdir, self.cfg.name, self.step)
        generation.write_answers(f"{stem}.txt", examples)
        pictures = [self.picture(q, a) for q, a, _ in examples]
        texts = [self.label(q, a) for q, a, _ in examples]
        generation.write_sample_grid(
            f"{stem}.png",
            np.stack([tile(p) for p in pictures]),
            texts,
            [score >= IOU_HIT for _, _, score in examples],
            text_height=48,
        )

    def label(self, question: Question, answer: str) -> str:
        """A sample's caption in the grid: the answer, after the object a refer question
        names or the video question."""
        if question.pair.task == "refer":
            obj = self.records[question.record]["shapes"][question.target]
            return f"{qwen_tasks.object_label(obj)}: {answer}"
        if question.pair.task == "video":
            return f"{question.pair.instruction} {answer}"
        return answer

    def picture(self, question: Question, answer: str) -> np.ndarray:
        """uint8 [H, W, 3]: what the question was about, with the answer drawn where it is a
        box (the true box green, the answer's orange, on the resized image)."""
        record = self.records[question.record]
        if "video" in record:
            video = np.asarray(record["video"])
            gap = np.full((video.shape[1], 4, 3), 255, np.uint8)
            return np.concatenate([video[0], gap, video[-1]], axis=1)
        image = np.asarray(record["image"])[..., :3]
        if question.pair.task != "refer":
            return image
        height, width = resized_size(record, self.seq)
        canvas = Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(canvas)
        box = qwen_tasks.parse_box(answer, (height, width), self.seq.box_format)
        if box is not None:
            draw.rectangle(_corners(box), outline=ANSWER_BOX, width=2)
        draw.rectangle(_corners(object_box(record, question.target, self.seq)), outline=TRUE_BOX)
        return np.asarray(canvas)


def _corners(box: Sequence[float]) -> tuple[float, float, float, float]:
    """A box as PIL draws it (x1 >= x0, y1 >= y0, the end inclusive)."""
    (x0, x1), (y0, y1) = sorted(box[::2]), sorted(box[1::2])
    return x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)


def tile(picture: np.ndarray, side: int = TILE) -> np.ndarray:
    """A picture of any size scaled to fit a `side` x `side` cell (aspect kept), centred on
    a white background: the common size of a sample grid's cells."""
    height, width = picture.shape[:2]
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(picture).resize(size, Image.Resampling.NEAREST)
    cell = Image.new("RGB", (side, side), (255, 255, 255))
    cell.paste(resized, ((side - size[0]) // 2, (side - size[1]) // 2))
    return np.asarray(cell)
