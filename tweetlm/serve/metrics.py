"""The numbers behind GET /metrics, in Prometheus' text format (prometheus.io/docs/instrumenting/exposition_formats).

Counted by the app on its event loop (one thread: no locks); the token counts, queue depth and running batch
size come from the engine's stats() at each scrape.
"""

from collections import Counter

# seconds; spans a tiny model's first token on a CPU (~ms) to a long reply under load (minutes)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# posts in a grounded prompt: 0 (no room, or none found) up to the most a request may retrieve (MAX_GROUNDING_K)
POST_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50)


class Histogram:
    """A cumulative histogram over `buckets` (upper bounds; default: seconds, BUCKETS)."""

    def __init__(self, buckets: tuple = BUCKETS):
        self.buckets = buckets
        self.counts, self.sum, self.count = [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            self.counts[i] += value <= bound
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        suffix = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{suffix} {self.sum:.6f}", f"{name}_count{suffix} {self.count}"]


class Metrics:
    """Requests by route and status, latency by route, time to first token, requests in flight."""

    def __init__(self):
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency: dict[str, Histogram] = {}
        self.ttft = Histogram()
        self.in_flight = 0  # generation requests being answered, streams included
        self.refused: Counter[str] = Counter()  # by --moderate: "input" (requests), "output" (choices stopped)
        self.grounded = 0  # chat requests grounded on the posts index
        self.grounding_posts = Histogram(POST_BUCKETS)  # posts in each grounded prompt
        self.citations: Counter[str] = Counter()  # [post:ID] markers in grounded answers: "kept", "stripped"

    def render(self, stats: dict) -> str:
        lines = ["# HELP tweetlm_requests_total HTTP requests answered, by route and status.",
                 "# TYPE tweetlm_requests_total counter"]
        lines += [f'tweetlm_requests_total{{route="{r}",status="{s}"}} {n}' for (r, s), n in sorted(self.requests.items())]
        lines += ["# HELP tweetlm_request_seconds Time from a request's arrival to its last byte.",
                  "# TYPE tweetlm_request_seconds histogram"]
        for route, hist in sorted(self.latency.items()):
            lines += hist.lines("tweetlm_request_seconds", f'route="{route}"')
        lines += ["# HELP tweetlm_time_to_first_token_seconds Time from a generation request's arrival to its first token.",
                  "# TYPE tweetlm_time_to_first_token_seconds histogram", *self.ttft.lines("tweetlm_time_to_first_token_seconds")]
        lines += ["# HELP tweetlm_moderation_refusals_total Requests refused for toxic input, and choices stopped for "
                  "toxic output (--moderate).", "# TYPE tweetlm_moderation_refusals_total counter"]
        lines += [f'tweetlm_moderation_refusals_total{{stage="{stage}"}} {self.refused[stage]}' for stage in ("input", "output")]
        lines += ["# HELP tweetlm_grounded_requests_total Chat requests grounded on posts from the index (--index).",
                  "# TYPE tweetlm_grounded_requests_total counter", f"tweetlm_grounded_requests_total {self.grounded}",
                  "# HELP tweetlm_grounding_posts Posts in the prompt of each grounded chat request (0: none found, "
                  "or no room in the context).", "# TYPE tweetlm_grounding_posts histogram",
                  *self.grounding_posts.lines("tweetlm_grounding_posts"),
                  "# HELP tweetlm_citations_total Citations [post:ID] in grounded answers: kept (the post was in the "
                  "prompt and is in the index) or stripped.", "# TYPE tweetlm_citations_total counter"]
        lines += [f'tweetlm_citations_total{{outcome="{o}"}} {self.citations[o]}' for o in ("kept", "stripped")]
        for name, kind, value, help in (
            ("prompt_tokens_total", "counter", stats["prompt_tokens_total"], "Prompt tokens prefilled."),
            ("completion_tokens_total", "counter", stats["completion_tokens_total"], "Tokens generated."),
            ("engine_requests_total", "counter", stats["requests_total"], "Sequences submitted to the engine (n per request)."),
            ("queue_depth", "gauge", stats["waiting"], "Sequences waiting for a place in the running batch."),
            ("running_batch_size", "gauge", stats["running"], "Sequences in the running batch."),
            ("requests_in_flight", "gauge", self.in_flight, "Generation requests being answered."),
        ):
            lines += [f"# HELP tweetlm_{name} {help}", f"# TYPE tweetlm_{name} {kind}", f"tweetlm_{name} {value}"]
        return "\n".join(lines) + "\n"
