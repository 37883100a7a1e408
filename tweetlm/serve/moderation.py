"""Moderation: the safety classifier (`serve --moderate`, tweetlm/artifacts/safety.py) on requests and replies, and the
POST /v1/moderations object.

Every prompt or message is scored before anything is queued: one at or above the threshold refuses the request
with 400, code "content_filter". Each reply is scored as it grows: a stream scores its text before sending each
piece, and a choice that reaches the threshold ends there with finish_reason "content_filter", the flagged piece
unsent and its decoding cancelled; a plain response scores each whole choice, and a flagged one comes back with
finish_reason "content_filter", its text withheld (chat: content null; completions: "", or the echoed prompt
alone; tasks: text null) and no logprobs. Refusals are counted in /metrics (tweetlm_moderation_refusals_total,
by stage). Without a classifier moderation is off: nothing is scored and /v1/moderations is 404.
"""

import asyncio

from tweetlm.infer.engine import Delta
from tweetlm.serve.metrics import Metrics
from tweetlm.serve.schemas import APIError
from tweetlm.serve.wire import Choice, new_id

# OpenAI's moderation categories (platform.openai.com/docs/api-reference/moderations). tweetlm's classifier gives
# one score, toxicity, trained on OffensEval (offensive: insults, threats, profanity) and HatEval (hate against
# immigrants and women): it fills harassment and hate, the two categories those sets cover; the others are
# not measured, so they read false and 0.0 and list no applied input type.
MODERATION_CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
                         "self-harm", "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors", "violence",
                         "violence/graphic")
MODERATED = ("harassment", "hate")
MODERATION_MODEL = "tweetlm-safety"


class Moderation:
    """The safety classifier on requests and replies (module docstring); off (classifier None), it lets
    everything through. Scoring runs in a worker thread, off the event loop: ~0.8 ms for a post, ~1.6 ms for a
    1,000-character reply (bench/safety.py)."""

    def __init__(self, classifier, metrics: Metrics):
        self.classifier, self.metrics = classifier, metrics

    async def _scores(self, texts: list[str]) -> list[float]:
        return (await asyncio.to_thread(self.classifier.score, texts)).tolist()

    async def _flagged(self, text: str) -> bool:
        return (await self._scores([text]))[0] >= self.classifier.threshold

    async def check_input(self, texts: list[str], param: str) -> None:
        """Refuses the request (400 content_filter) if one of its texts is flagged."""
        if self.classifier is None:
            return
        threshold = self.classifier.threshold
        for i, score in enumerate(await self._scores(texts)):
            if score >= threshold:
                self.metrics.refused["input"] += 1
                raise APIError(400, f"the server's moderation refused this request: {param}[{i}] scores {score:.2f} "
                                    f"toxic, at or above its threshold {threshold:.2f}; rephrase it",
                               param=param, code="content_filter")

    async def screen(self, sent: str, delta: Delta) -> Delta:
        """A streamed delta of a choice that has sent `sent` so far, as it may go out: unchanged, or, if the text
        with it is flagged, an empty delta that ends the choice with finish_reason "content_filter" (the caller
        then cancels its decoding)."""
        if self.classifier is None or not delta.text or not await self._flagged(sent + delta.text):
            return delta
        self.metrics.refused["output"] += 1
        return Delta("", [], [], "content_filter")  # the flagged piece is not sent

    async def withhold_flagged(self, choices: list[Choice]) -> None:
        """Whole choices, scored together: each flagged one withheld."""
        if self.classifier is None:
            return
        for choice, score in zip(choices, await self._scores([c.text for c in choices])):
            if score >= self.classifier.threshold:
                choice.withhold()
                self.metrics.refused["output"] += 1

    async def withholds(self, text: str) -> bool:
        """Whether a whole reply (a task's post) is withheld: flagged, and counted."""
        if self.classifier is None or not await self._flagged(text):
            return False
        self.metrics.refused["output"] += 1
        return True

    async def classify(self, texts: list[str]) -> dict:
        """POST /v1/moderations: OpenAI's moderation object, one result per text (flagged at score >= threshold)."""
        if self.classifier is None:
            raise APIError(404, "moderation is off on this server: start it with `tweetlm serve RUN --moderate SAFETY`",
                           code="not_found")
        results = []
        for score in await self._scores(texts):
            flagged = score >= self.classifier.threshold
            results.append({
                "flagged": flagged,
                "categories": {c: flagged and c in MODERATED for c in MODERATION_CATEGORIES},
                "category_scores": {c: score if c in MODERATED else 0.0 for c in MODERATION_CATEGORIES},
                "category_applied_input_types": {c: ["text"] if c in MODERATED else [] for c in MODERATION_CATEGORIES},
            })
        return {"id": new_id("modr"), "model": MODERATION_MODEL, "results": results}
