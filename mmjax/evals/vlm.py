"""Answers of a VLM (mmjax.models.vlm) on held-out records, decoded greedily and scored.

The first `num_samples` records of `split` are asked the instructions of the training tasks
(mmjax.data.vlm_tasks), laid out as the run's `data.sequence` lays out a prompt:

  caption    one caption prompt a record; `caption_accuracy` judges the decoded caption as
             the Transfusion eval does: on the digits it must name the record's digit, on
             the shapes describe its scene (mmjax.evals.generation), elsewhere equal one of
             the record's captions up to case and spaces.
  vqa        every question of the record; `vqa_accuracy` is the exact-match rate of the short
             answer (up to case and spaces), `vqa_<kind>_accuracy` the rate of each kind.
  refer      every referring phrase of the record (shapes only); `grounding_miou` is the mean
             IoU of the first box parsed from the answer with the true box (0 when none
             parses), `grounding_accuracy` the rate of IoU >= 0.5 (RefCOCO's criterion).
             On scenes of two or more objects the phrase must pick its object out:
             `grounding_miou_distractors` is the mean IoU there, `grounding_wrong_object`
             the rate at which the box overlaps another object more than the named one.

`workdir/samples/<name>_<k>.txt` (and `.png`, images framed green or red by the verdict) hold
the first `num_examples` answers of each task at the k-th evaluation of the run.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from mmjax.data.sequences import vlm_layout
from mmjax.data.sources import build_source
from mmjax.data.vlm_tasks import (
    TaskPair,
    box_iou,
    box_text,
    caption_variants,
    parse_boxes,
    task_pairs,
)
from mmjax.errors import UserError
from mmjax.evals import generation
from mmjax.evals.features import EvalContext
from mmjax.evals.transfusion import record_pixels
from mmjax.sampling.vlm import generate

Record = Mapping[str, Any]
# task -> the standard metric it reports (DESIGN.md)
TASK_METRICS = {"caption": "caption_accuracy", "vqa": "vqa_accuracy", "refer": "grounding_miou"}
IOU_HIT = 0.5  # RefCOCO: a box is right at IoU >= 0.5


def normalise(text: str) -> str:
    """Lower case, single spaces, no leading or trailing space."""
    return " ".join(text.lower().split())


def caption_correct(caption: str, record: Record, source: str) -> bool:
    """Whether a decoded caption is right for `record` (module docstring)."""
    if source == "digits":
        return generation.caption_accuracy([caption], [int(record["label"])]) == 1.0
    if source == "shapes":
        return generation.shapes_caption_accuracy([caption], [record]) == 1.0
    return normalise(caption) in {normalise(r["caption"]) for r in caption_variants(record)}


def box_score(answer: str, reference: str, width: int, height: int) -> float:
    """IoU of the first box of `answer` with the box of `reference` (Qwen-VL box texts in a
    `width` x `height` image); 0 when `answer` holds no box."""
    (truth, *_) = parse_boxes(reference, width, height)
    found = parse_boxes(answer, width, height)
    return box_iou(found[0].box, truth.box) if found else 0.0


def score_answer(answer: str, pair: TaskPair, record: Record, source: str) -> float:
    """The score of a decoded `answer` to `pair` about `record`: 1 or 0 for captions and
    questions, the IoU for a referring phrase."""
    if pair.task == "caption":
        return float(caption_correct(answer, record, source))
    if pair.task == "vqa":
        return float(normalise(answer) == normalise(pair.answer))
    if pair.task == "refer":
        height, width = np.asarray(record["image"]).shape[:2]
        return box_score(answer, pair.answer, width, height)
    raise UserError(f"the vlm eval scores tasks {tuple(TASK_METRICS)}, not {pair.task!r}")


@dataclasses.dataclass(frozen=True)
class Question:
    """One prompt of the eval: record `record` (an index) asked `pair`, as ids to decode from."""

    record: int
    pair: TaskPair
    prompt_ids: tuple[int, ...]


def distractor_iou(answer: str, pair: TaskPair, record: Record) -> float | None:
    """The largest IoU of the answer's first box with an object `pair` does not name; None
    when the scene holds no other object, 0 when the answer holds no box."""
    height, width = np.asarray(record["image"]).shape[:2]
    others = [o for o in record["shapes"] if box_text(o["bbox"], width, height) != pair.answer]
    if not others:
        return None
    found = parse_boxes(answer, width, height)
    return max(box_iou(found[0].box, o["bbox"]) for o in others) if found else 0.0


def distractor_metrics(
    answers: Sequence[str],
    questions: Sequence[Question],
    ious: np.ndarray,
    records: Sequence[Record],
) -> dict[str, float]:
    """grounding_miou_distractors and grounding_wrong_object (module docstring) of the refer
    questions whose scene holds other objects; {} when none does."""
    rows = [
        (iou, distractor_iou(a, q.pair, records[q.record]))
        for a, q, iou in zip(answers, questions, ious, strict=True)
    ]
    rows = np.asarray([(iou, other) for iou, other in rows if other is not None])
    if not len(rows):
        return {}
    return {
        "grounding_miou_distractors": float(rows[:, 0].mean()),
        "grounding_wrong_object": float(np.mean(rows[:, 1] > rows[:, 0])),
    }


def answer_in_batches(
    lengths: Sequence[int],
    size: int,
    name: str,
    decode: Callable[[list[int]], np.ndarray],
    tokenizer: Any,
) -> list[str]:
    """The answers to questions 0 .. n-1 decoded in batches of `size` (the last filled up with
    repeats, so every batch compiles alike), questions of similar `lengths` batched together:
    `decode(rows)` gives the answer ids [size, T] of those questions, with a progress bar."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    answers = [""] * len(lengths)
    starts = range(0, len(order), size)
    for start in tqdm(starts, desc=f"eval {name}", disable=jax.process_index() != 0):
        chunk = order[start : start + size]
        rows = chunk + chunk[-1:] * (size - len(chunk))
        for i, row in zip(chunk, decode(rows), strict=False):
            answers[i] = tokenizer.decode(row.tolist())
    return answers


class VlmEval:
    """`evals.NAME = dict(type="vlm", split, num_samples, batch_size, tasks, max_new_tokens,
    num_examples)`: `tasks` among TASK_METRICS (default: those the source supports);
    `max_new_tokens` 0 (default) allows the longest reference answer and its <eos>."""

    def __init__(self, cfg: ml_collections.ConfigDict, ctx: EvalContext):
        seq = ctx.data_cfg.sequence
        if seq.get("kind") != "vlm":
            raise UserError(f"evals.{cfg.name}: the vlm eval needs data.sequence.kind 'vlm'")
        self.cfg, self.ctx, self.source = cfg, ctx, ctx.data_cfg.source
        split = build_source(ctx.data_cfg, cfg.split)
        self.records = [split[i] for i in range(min(int(cfg.num_samples), len(split)))]
        pixels = np.stack([record_pixels(r, ctx.data_cfg) for r in self.records])
        self.pixels = pixels[..., : int(seq.channels)]
        self.questions = self._questions(cfg.get("tasks"))
        tok = ctx.tokenizer
        asked = [q for qs in self.questions.values() for q in qs]
        references = [q.pair.answer for q in asked] + [
            r["caption"]
            for q in asked
            if q.pair.task == "caption"
            for r in caption_variants(self.records[q.record])
        ]
        longest = max(len(tok.encode(text)) for text in references) + 1  # and <eos>
        self.max_new_tokens = int(cfg.get("max_new_tokens", 0)) or longest
        self.step = 0

    def _questions(self, tasks: Sequence[str] | None) -> dict[str, list[Question]]:
        """{task: its questions}; a task asked for that no record supports is an error."""
        seq, tok = self.ctx.data_cfg.sequence, self.ctx.tokenizer
        unknown = sorted(set(tasks or ()) - set(TASK_METRICS))
        if unknown:
            raise UserError(
                f"evals.{self.cfg.name}.tasks {unknown} are unknown; valid: {tuple(TASK_METRICS)}"
            )
        out = {}
        for task in tasks or TASK_METRICS:
            questions = []
            for i, record in enumerate(self.records):
                pairs = task_pairs(record, task, self.source)
                for pair in pairs[:1] if task == "caption" else pairs:
                    ids = tok.encode(pair.prompt(seq.task_identifiers))
                    row = vlm_layout(ids, [], tok, seq)
                    prompt = row["tokens"][: int(row["segment_ids"].sum())]
                    questions.append(Question(i, pair, tuple(int(t) for t in prompt)))
            if questions:
                out[task] = questions
            elif tasks:
                raise UserError(
                    f"evals.{self.cfg.name}: no record of data.source {self.source!r} supports "
                    f"the task {task!r} (boxes need 'shapes')"
                )
        return out

    def answers(self, params: Any, questions: Sequence[Question]) -> list[str]:
        """Greedy answers to `questions` (`answer_in_batches`); prompts of one length batch
        together."""
        decoder = self.ctx.model.clone(decode=True)
        tok = self.ctx.tokenizer

        def decode(rows: list[int]) -> np.ndarray:
            images = self.pixels[[questions[i].record for i in rows]]
            if decoder.mode == "flamingo":
                images = images[:, None]  # one media per row
            return generate(
                decoder,
                params,
                images,
                [questions[i].prompt_ids for i in rows],
                image_id=tok.image_id,
                eos_id=tok.eos_id,
                pad_id=tok.pad_id,
                max_new_tokens=self.max_new_tokens,
            )

        lengths = [len(q.prompt_ids) for q in questions]
        return answer_in_batches(lengths, int(self.cfg.batch_size), self.cfg.name, decode, tok)

    def __call__(self, params: Any) -> dict[str, float]:
        flat = [q for qs in self.questions.values() for q in qs]
        answers = self.answers(params, flat)
        scores = [
            score_answer(a, q.pair, self.records[q.record], self.source)
            for q, a in zip(flat, answers, strict=True)
        ]
        metrics, examples, start = {}, [], 0
        for task, questions in self.questions.items():
            task_scores = np.asarray(scores[start : start + len(questions)])
            metrics[TASK_METRICS[task]] = float(task_scores.mean())
            if task == "vqa":
                kinds = np.asarray([q.pair.kind for q in questions])
                for kind in sorted(set(kinds)):
                    metrics[f"vqa_{kind}_accuracy"] = float(task_scores[kinds == kind].mean())
            if task == "refer":
                metrics["grounding_accuracy"] = float(np.mean(task_scores >= IOU_HIT))
                task_answers = answers[start : start + len(questions)]
                metrics.update(
                    distractor_metrics(task_answers, questions, task_scores, self.records)
                )
            n = int(self.cfg.get("num_examples", 8))
            examples += list(zip(questions[:n], answers[start:], task_scores[:n], strict=False))
            start += len(questions)
        self._write_examples(examples)
        return metrics

    def _write_examples(self, examples: list[tuple[Question, str, float]]) -> None:
        """The text file and image grid of the first answers of each task."""
        if self.ctx.workdir is None or jax.process_index() != 0 or not examples:
            return
        self.step += 1
        stem = generation.answers_stem(self.ctx.workdir, self.cfg.name, self.step)
        generation.write_answers(f"{stem}.txt", examples)
        texts = [
            a if q.pair.task == "caption" else f"{q.pair.instruction} {a}" for q, a, _ in examples
        ]
        generation.write_sample_grid(
            f"{stem}.png",
            self.pixels[[q.record for q, _, _ in examples]],
            texts,
            [score >= IOU_HIT for _, _, score in examples],
        )
