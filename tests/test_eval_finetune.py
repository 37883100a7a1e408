"""`tweetlm eval tweeteval RUN`: a tiny pretrained run fine-tuned with a classification head per task, end to end
on a subsample of real TweetEval posts (files the official script reads, scores, the table beside the floor);
the head learning a separable task; padding that changes nothing, for either pooling; the same seed, the same
predictions; layer-wise LR decay and task-adaptive pretraining doing what they claim; classifiers kept with
--save labelling posts through `tweetlm classify` as eval predicted them, and its one-line errors."""

import copy
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tweetlm.artifacts.classifiers import saved_tasks
from tweetlm.cli import main
from tweetlm.eval.classify import classify
from tweetlm.eval.finetune import (Classifier, _encode, _optimizer, _pad, finetuner, load_classifier, next_tokens,
                                   tapt)
from tweetlm.eval.tweeteval import STANCE_TARGETS, Dataset, Split, load_task
from tweetlm.model.llama import IGNORE_INDEX
from tweetlm.model.weights import load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tweeteval"


class _Bar:
    """What a predictor may call on its tqdm bar."""

    def __init__(self):
        self.total, self.n, self.postfix = None, 0, ""

    def reset(self, total=None):
        self.total, self.n = total, 0

    def update(self, n=1):
        self.n += n

    def set_postfix_str(self, s="", refresh=True):
        self.postfix = s


def test_run_end_to_end_on_a_subsample(served_run, tmp_path, capsys):
    args = ["eval", "tweeteval", str(served_run), "--data", str(DATA), "--tasks", "irony,stance",
            "--max-train-examples", "40", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--seed", "3"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    table = capsys.readouterr().out
    for row in ("tiny-chat", "tfidf", "FastText", "-- this run, val split"):
        assert row in table, table
    scores = json.loads((tmp_path / "a" / "scores.json").read_text())
    assert set(scores["scores"]) == {"tiny-chat", "tfidf"} and scores["config"]["epochs"] == 1
    run_preds = tmp_path / "a" / "tiny-chat"
    lines = (run_preds / "irony.txt").read_text().split("\n")
    assert len(lines) == 955 + 1 and lines[-1] == "" and set(lines[:-1]) <= {"0", "1"}  # the official reading
    for target, n in zip(STANCE_TARGETS, (66, 52, 40, 67, 69)):
        assert len((run_preds / "stance" / f"{target}.txt").read_text().split("\n")[:-1]) == n
    assert 0 <= scores["scores"]["tiny-chat"]["stance"] <= 1
    # the same seed gives the same predictions, file for file
    assert main([*args, "--tasks", "stance", "--out", str(tmp_path / "b")]) == 0
    for target in STANCE_TARGETS:
        path = Path("stance") / f"{target}.txt"
        assert (run_preds / path).read_bytes() == (tmp_path / "b" / "tiny-chat" / path).read_bytes(), target


def _marked(n_train: int, n_val: int) -> Dataset:
    """Real posts, labelled by whether a marker word was put in them."""
    n = n_train + n_val
    posts = [p.strip() for p in (DATA / "emotion" / "train_text.txt").read_text(encoding="utf-8").splitlines()[:n]]
    labels = np.arange(n) % 2
    texts = [f"zebra {p}" if y else p for p, y in zip(posts, labels)]
    val = Split(texts[n_train:], labels[n_train:])
    return Dataset("irony", None, ("not", "marked"), Split(texts[:n_train], labels[:n_train]), val, val)


def test_the_head_learns_a_separable_task(served_run):
    """Posts labelled by a marker word: the tiny run must learn to read it."""
    ds, bar = _marked(240, 60), _Bar()
    predict = finetuner(served_run, epochs=4, lr=1e-3, batch_size=16, device="cpu")
    pred = predict(ds, seed=0, progress=bar)
    assert (pred == ds.val.labels).mean() >= 0.9, pred
    assert bar.n == bar.total == 4 * 15 and "best" in bar.postfix, bar.postfix
    # another split (test, say) is predicted by the state chosen on val: here the same posts, the same answers
    unlabelled = Split(list(ds.val.texts), None)
    np.testing.assert_array_equal(predict(replace(ds, eval=unlabelled), seed=0, progress=_Bar()), pred)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_padding_changes_no_prediction(served_run, pooling):
    """The model is causal and the mean leaves pads out, so a post's logits are the same alone or right-padded
    beside a longer one; and the mean is not the last token's state."""
    trunk, tokenizer = load_model(served_run)
    model = Classifier(trunk, 3, pooling)
    torch.nn.init.normal_(model.head.weight, generator=torch.Generator().manual_seed(0))
    (irony,) = load_task(DATA, "irony", "val")
    posts = _encode(tokenizer, irony.val.texts[:6], trunk.config.max_seq_len)
    assert len({len(p) for p in posts}) > 1
    cpu = torch.device("cpu")
    with torch.no_grad():
        together = model(*_pad(posts, list(range(6)), cpu))
        alone = torch.cat([model(*_pad(posts, [i], cpu)) for i in range(6)])
        hidden = trunk.hidden(_pad(posts, [0], cpu)[0])[0]  # [T, D] of the first post, alone
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    pooled = hidden.mean(dim=0) if pooling == "mean" else hidden[-1]
    torch.testing.assert_close(together[0], model.head(pooled), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hidden.mean(dim=0), hidden[-1], atol=1e-3)


def test_layer_decay_gives_lower_layers_smaller_steps(served_run, tmp_path):
    trunk, _ = load_model(served_run)
    model = Classifier(trunk, 2)
    lr_of = {id(p): g["lr"] for g in _optimizer(model, 1e-3, layer_decay=0.5).param_groups for p in g["params"]}
    depth = trunk.config.depth
    assert lr_of[id(model.head.weight)] == lr_of[id(trunk.norm.weight)] == 1e-3
    for i, block in enumerate(trunk.blocks):
        assert all(lr_of[id(p)] == pytest.approx(1e-3 * 0.5 ** (depth - 1 - i)) for p in block.parameters()), i
    assert lr_of[id(trunk.embed.weight)] == pytest.approx(1e-3 * 0.5**depth)
    assert {g["lr"] for g in _optimizer(model, 1e-3).param_groups} == {1e-3}  # 1.0: one LR, as before the option
    # fine-tuned and saved: the embedding moves about layer_decay^depth as far, the head as far
    ds, moved = _marked(48, 16), {}
    for decay in (1.0, 0.1):
        predict = finetuner(served_run, epochs=1, lr=1e-3, batch_size=16, layer_decay=decay, save=tmp_path / str(decay),
                            device="cpu")
        predict(ds, seed=0, progress=_Bar())
        tuned, _ = load_classifier(tmp_path / str(decay) / "irony", device=torch.device("cpu"))
        moved[decay] = [(tuned.trunk.embed.weight - trunk.embed.weight).abs().sum().item(),
                        tuned.head.weight.abs().sum().item()]
    assert moved[0.1][0] < 0.05 * moved[1.0][0] and moved[1.0][0] > 0
    assert moved[0.1][1] == pytest.approx(moved[1.0][1], rel=0.5)


def test_next_token_targets_end_each_post_with_the_boundary():
    tokens, lengths = torch.tensor([[1, 5, 6, 0], [1, 7, 0, 0]]), torch.tensor([3, 2])
    assert next_tokens(tokens, lengths, 1).tolist() == [[5, 6, 1, IGNORE_INDEX], [7, 1, IGNORE_INDEX, IGNORE_INDEX]]


def test_tapt_lowers_the_lm_loss_on_the_task_texts(served_run):
    trunk, tokenizer = load_model(served_run)
    (irony,) = load_task(DATA, "irony", "val", max_train_examples=64)
    posts = _encode(tokenizer, irony.train.texts, trunk.config.max_seq_len)
    tokens, lengths = _pad(posts, list(range(len(posts))), torch.device("cpu"))
    targets = next_tokens(tokens, lengths, tokenizer.boundary_id)

    def lm_loss(model) -> float:
        with torch.no_grad():
            return model.eval()(tokens, targets).item()

    adapted, bar = copy.deepcopy(trunk), _Bar()
    tapt(adapted, posts, steps=12, lr=1e-3, batch_size=16, boundary=tokenizer.boundary_id,
         generator=torch.Generator().manual_seed(0), progress=bar)
    assert bar.n == 12 and "tapt loss" in bar.postfix
    assert not torch.equal(adapted.blocks[0].attention.wq.weight, trunk.blocks[0].attention.wq.weight)
    assert lm_loss(adapted) < lm_loss(trunk) - 0.1, (lm_loss(adapted), lm_loss(trunk))
    # in a fine-tune: its steps come first, on the same bar
    bar = _Bar()
    predict = finetuner(served_run, epochs=1, lr=1e-3, batch_size=16, tapt_steps=2, device="cpu")
    predict(_marked(48, 16), seed=0, progress=bar)
    assert bar.n == bar.total == 2 + 3


def _official_lines(path: Path) -> list[str]:
    return path.read_text().split("\n")[:-1]  # as the benchmark's script reads a file


def test_saved_classifiers_label_posts_as_eval_predicted(served_run, tmp_path, capsys, monkeypatch):
    save, out = tmp_path / "classifiers", tmp_path / "out"
    assert main(["eval", "tweeteval", str(served_run), "--data", str(DATA), "--tasks", "irony,stance",
                 "--max-train-examples", "40", "--epochs", "2", "--batch-size", "8", "--device", "cpu", "--pooling",
                 "mean", "--layer-decay", "0.8", "--tapt-steps", "2", "--save", str(save), "--out", str(out)]) == 0
    assert saved_tasks(save) == ["irony", *[f"stance/{t}" for t in STANCE_TARGETS]]
    assert sorted(p.name for p in (save / "irony").iterdir()) == ["classifier.json", "model.safetensors"]
    info = json.loads((save / "irony" / "classifier.json").read_text())
    assert info["labels"] == ["non_irony", "irony"] and info["pooling"] == "mean" and info["tapt_steps"] == 2
    datasets = {ds.name: ds for task in ("irony", "stance") for ds in load_task(DATA, task, "val")}
    for name in ("irony", "stance/climate"):
        ds = datasets[name]
        rows = classify(save, name, ds.val.texts, device="cpu")
        eval_pred = [int(x) for x in _official_lines(out / "tiny-chat" / f"{name}.txt")]
        assert [ds.labels.index(r["label"]) for r in rows] == eval_pred
        assert all(set(r["probabilities"]) == set(ds.labels) and abs(sum(r["probabilities"].values()) - 1) < 1e-3
                   for r in rows)
    # the verb: posts as arguments, or on stdin with - (blank lines skipped), one JSON line each
    posts = datasets["irony"].val.texts[:3]
    capsys.readouterr()
    assert main(["classify", str(save), "--task", "irony", "--device", "cpu", *posts]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == classify(save, "irony", posts, device="cpu") and [r["text"] for r in lines] == posts
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join([posts[0], "", *posts[1:]]) + "\n"))
    assert main(["classify", str(save), "--task", "irony", "--device", "cpu", "-"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == lines
    # one-line errors: no such DIR, a task not saved (the saved ones listed), no posts, another run's tokenizer there
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert main(["classify", str(tmp_path / "nothing"), "--task", "irony", "a post"]) == 2
    assert main(["classify", str(save), "--task", "stance", "a post"]) == 2
    assert main(["classify", str(save), "--task", "irony", "-"]) == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "tokenizer.json").write_text("{}")
    assert main(["eval", "tweeteval", str(served_run), "--data", str(DATA), "--save", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4, err
    assert "nothing does not exist: keep a run's classifiers with `tweetlm eval tweeteval RUN" in err[0]
    assert "no 'stance' classifier in" in err[1] and "it holds irony, stance/abortion, stance/atheism" in err[1]
    assert "no posts to classify" in err[2] and "another tokenizer" in err[3]

