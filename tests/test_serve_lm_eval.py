"""EleutherAI's lm-evaluation-harness against a live `tweetlm serve`: its `local-completions` model scores
log-likelihood tasks through /v1/completions (token-id prompts, echo with logprobs), here two tasks defined from
local files (no hub download): TweetEval irony as a two-choice task, and bits per byte of posts
(loglikelihood_rolling), checked against the model's own arithmetic and against `tweetlm eval bpb`."""

import json
import math

import pytest
import torch
from helpers import CONTEXT, DATA, live_server

from tweetlm.eval.bpb import BpbConfig, bpb
from tweetlm.model.weights import load_model

IRONY = DATA / "tweeteval" / "irony"
CHOICES = ["no", "yes"]  # after lm-eval's target_delimiter, " "


def _tasks(folder, posts: list[str]) -> list[str]:
    """Two task YAMLs in `folder` over local JSON Lines files (HF datasets' json builder: no download)."""
    texts = (IRONY / "val_text.txt").read_text(encoding="utf-8").splitlines()[:12]
    labels = (IRONY / "val_labels.txt").read_text().split()[:12]
    (folder / "irony.jsonl").write_text("".join(json.dumps({"text": t, "label": int(y)}) + "\n" for t, y in zip(texts, labels)))
    (folder / "posts.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in posts))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "irony.yaml").write_text(
        f"task: tweetlm_irony\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'irony.jsonl'}\n"
        f"output_type: multiple_choice\ndoc_to_text: \"{{{{text}}}}\\nIronic?\"\ndoc_to_choice: {json.dumps(CHOICES)}\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n")
    (folder / "posts.yaml").write_text(
        f"task: tweetlm_posts\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'posts.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n")
    return ["tweetlm_irony", "tweetlm_posts"]


@pytest.mark.timeout(600)
def test_lm_evaluation_harness_scores_local_tasks_through_the_api(served_run, tmp_path, monkeypatch):
    for name in ("HF_HOME", "HF_DATASETS_CACHE"):
        monkeypatch.setenv(name, str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    posts = (DATA / "tweeteval" / "emotion" / "val_text.txt").read_text(encoding="utf-8").splitlines()[:16]
    tasks = _tasks(tmp_path, posts)
    with live_server(served_run) as (url, _):
        args = (f"base_url={url}/v1/completions,model={served_run.name},tokenizer={served_run},"
                f"tokenizer_backend=huggingface,max_length={CONTEXT},num_concurrent=1,max_retries=1")
        out = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=tasks, log_samples=True,
                                      task_manager=TaskManager(include_path=str(tmp_path)))
    model, tokenizer = load_model(served_run)

    def logprob(context: list[int], continuation: list[int]) -> float:
        """log P(continuation | context) by a forward of the model itself."""
        with torch.no_grad():
            logp = model(torch.tensor([context + continuation]))[0].log_softmax(-1)  # [T, V]
        return sum(logp[len(context) + i - 1, t].item() for i, t in enumerate(continuation))

    # the two-choice task: every choice's log-likelihood is the model's own (context, then " no" / " yes")
    samples = out["samples"]["tweetlm_irony"]
    assert len(samples) == 12 and 0 <= out["results"]["tweetlm_irony"]["acc,none"] <= 1
    for sample in samples[:4]:
        context = sample["doc"]["text"] + "\nIronic?"
        for (ll, _), choice in zip((r[0] for r in sample["resps"]), CHOICES):
            whole, head = tokenizer.encode(context + " " + choice), tokenizer.encode(context)  # as lm-eval splits them
            assert ll == pytest.approx(logprob(head, whole[len(head):]), abs=1e-3)

    # bits per byte of whole posts: each post after <|endoftext|> (the tokenizer's eos, lm-eval's prefix token)
    got = out["results"]["tweetlm_posts"]["bits_per_byte,none"]
    nats = sum(-logprob([tokenizer.boundary_id], tokenizer.encode(p)) for p in posts)
    n_bytes = sum(len(p.encode()) for p in posts)
    assert got == pytest.approx(nats / n_bytes / math.log(2), rel=1e-4)
    # `eval bpb` scores the same posts and also each post's end (the next <|endoftext|>): a little more
    (tmp_path / "posts.txt").write_text("\n".join(posts) + "\n", encoding="utf-8")
    ours = bpb(BpbConfig(run=served_run, text=tmp_path / "posts.txt"))["bpb"]
    print(f"lm-eval bits_per_byte {got:.4f}, the model's own {nats / n_bytes / math.log(2):.4f}, eval bpb {ours:.4f}")
    assert got < ours < got * 1.15, (got, ours)
