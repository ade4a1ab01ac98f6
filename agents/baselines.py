"""Baseline policies: random, a scripted oracle that uses the sample's evidence, and answer-only."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from agents.base import EpisodeContext
from pxr_env.actions import format_answer, format_tool_call
from pxr_env.tasks import CHOICE_LETTERS, Sample, TaskSource

RANDOM_TURNS = (
    "Let me think about it.",
    "\\boxed{{{answer}}}",
    "<tool_call>\n{{\"name\": \"crop_image\", \"arguments\": {{\"bbox_2d\": [{x1:.2f}, {y1:.2f}, {x2:.2f}, {y2:.2f}], \"target_image\": 1}}}}\n</tool_call>",
    "<tool_call>\n{{\"name\": \"select_frames\", \"arguments\": {{\"target_frames\": [{f1}, {f2}]}}}}\n</tool_call>",
    "<tool_call>\n{{\"name\": \"crop_image\", \"arguments\": {{\"bbox_2d\": [{x1:.2f}, {y1:.2f}",
)


class RandomPolicy:
    """Random plausible turns (text mode) or samples of the action space (structured mode).

    Text turns mix random crops, random frame selections, random answers (a choice letter
    or a small number), malformed calls and idle text, so every path of the env is exercised.
    """

    def __init__(self, seed: int = 0, action_space: Any = None) -> None:
        self.action_space = action_space
        self.seed(seed)

    def seed(self, seed: int) -> None:
        """Restart the random streams from `seed` (`agents.rollout.collect` calls it for reproducible runs)."""
        self.rng = np.random.default_rng(seed)
        if self.action_space is not None:
            self.action_space.seed(seed)

    def act(self, observations: Sequence[Any], contexts: Sequence[EpisodeContext]) -> list[Any]:
        if self.action_space is not None:
            return [self.action_space.sample() for _ in observations]
        return [self._turn(c) for c in contexts]

    def _turn(self, context: EpisodeContext) -> str:
        info = context.reset_info
        choices = info.get("choices") or []
        answer = CHOICE_LETTERS[int(self.rng.integers(len(choices)))] if choices else str(int(self.rng.integers(0, 10)))
        x1, y1 = self.rng.uniform(0, 0.8, size=2)
        x2, y2 = x1 + self.rng.uniform(0.05, 0.2), y1 + self.rng.uniform(0.05, 0.2)
        n = max(1, int(info.get("num_frames") or 16))
        f1 = int(self.rng.integers(1, n + 1))
        template = RANDOM_TURNS[int(self.rng.choice(len(RANDOM_TURNS), p=[0.1, 0.4, 0.3, 0.1, 0.1]))]
        return template.format(answer=answer, x1=x1, y1=y1, x2=x2, y2=y2, f1=f1, f2=min(n, f1 + 1))


class OraclePolicy:
    """Scripted from the sample's evidence and gold answer (a privileged upper bound).

    With ``use_operations=True`` it crops the evidence box (or selects the evidence frames)
    once, then answers with the gold answer; with False it answers at once (the "no zoom"
    bound when paired with a reader; with the gold answer it scores 100% either way, so the
    answer-only bound of a *perceiving* agent is measured by `AnswerOnlyPolicy` with a
    reader, see docs). Looks samples up in `task_source` by the episode's sample id.
    """

    def __init__(self, task_source: TaskSource, use_operations: bool = True) -> None:
        self.task_source = task_source
        self.use_operations = use_operations

    def act(self, observations: Sequence[Any], contexts: Sequence[EpisodeContext]) -> list[str]:
        return [self._turn(self.task_source.get(c.sample_id), c) for c in contexts]

    @staticmethod
    def evidence_call(sample: Sample) -> str | None:
        """The tool call that looks at the evidence, or None when the sample has none."""
        if sample.is_video and sample.evidence_frames:
            return format_tool_call("select_frames", {"target_frames": list(sample.evidence_frames)[:8]})
        if not sample.is_video and sample.evidence_box is not None:
            height, width = sample.load_image().shape[:2]
            x1, y1, x2, y2 = sample.evidence_box
            box = [round(x1 / width, 4), round(y1 / height, 4), round(min(x2 / width, 0.9999), 4), round(min(y2 / height, 0.9999), 4)]
            return format_tool_call("crop_image", {"bbox_2d": box, "target_image": 1})
        return None

    def _turn(self, sample: Sample, context: EpisodeContext) -> str:
        call = self.evidence_call(sample) if self.use_operations else None
        if call is not None and context.turn == 0:
            return call
        return format_answer(sample.answers[0])


class ReaderPolicy(OraclePolicy):
    """The synthetic suite's template reader as a policy: the bounds that perception allows.

    With ``use_operations=True`` it looks at the evidence (as `OraclePolicy`), then answers
    what the reader reads in that crop or those frames; with False it answers at once what
    the reader reads in the initial view (the "no zoom" bound of docs/tasks.md). Synthetic
    families only (`pxr_env.tasks.synthetic.reader_answer`).
    """

    def _turn(self, sample: Sample, context: EpisodeContext) -> str:
        from pxr_env.tasks.synthetic import reader_answer

        call = self.evidence_call(sample) if self.use_operations else None
        if call is not None and context.turn == 0:
            return call
        return format_answer(reader_answer(sample, with_ops=call is not None))


class AnswerOnlyPolicy:
    """Never uses an operation: answers at the first turn with `answer_fn(observation, context)`.

    The default answer is the first choice letter (or "0"), which gives the chance-level
    bound of a policy that cannot see; pass a reader to measure what the initial view alone allows.
    """

    def __init__(self, answer_fn: Any = None) -> None:
        self.answer_fn = answer_fn

    def act(self, observations: Sequence[Any], contexts: Sequence[EpisodeContext]) -> list[str]:
        out = []
        for obs, ctx in zip(observations, contexts):
            answer = self.answer_fn(obs, ctx) if self.answer_fn else ("A" if ctx.reset_info.get("choices") else "0")
            out.append(format_answer(str(answer)))
        return out
