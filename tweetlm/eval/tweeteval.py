"""`tweetlm eval tweeteval`: TweetEval (Barbieri et al., Findings of EMNLP 2020), six tweet classification tasks.

    tweetlm eval tweeteval work/demo/run --data ../shared/data/tweeteval --split val   # a run, fine-tuned per task
    tweetlm eval tweeteval --model tfidf --data ../shared/data/tweeteval --split val   # the floor alone
    tweetlm eval tweeteval work/demo/run --data ../shared/data/tweeteval --save work/classifiers  # kept, for classify

DATA is laid out as TweetEval's own `datasets/` folder: TASK/{split}_text.txt (one tweet per line),
TASK/{split}_labels.txt (one label id per line), TASK/mapping.txt (id, tab, name); stance has one such folder
per target (stance/abortion/ ...) and its mapping.txt above them. A classifier is trained per task and per
stance target, on train, tuned on val; it predicts the asked split. Predictions go to OUT/MODEL/TASK.txt and
OUT/MODEL/stance/TARGET.txt, one label id per line, which the benchmark's own evaluation script scores
(`--predictions_path OUT/MODEL`). Where the split has labels, the official metrics are computed (metrics.py)
and printed beside the published rows, and everything goes to OUT/scores.json.

A model plugs in as a `Predictor`: `predict(dataset, *, seed, progress) -> label ids` for dataset.eval.texts,
trained on dataset.train and tuned on dataset.val (never on eval's labels), reporting through `progress` (a
tqdm bar: set its total, update it). A run is fine-tuned with a classification head per task (finetune.py),
its row named after its folder, and the floor is trained beside it in the same table: `tfidf_baseline`, TF-IDF
n-grams + logistic regression (logistic.py), its C chosen on val by the task's official metric. When the split
asked is val, both are scored on the split they were tuned on (the run's epoch, the floor's C), so their val
scores are a little optimistic. With `--save DIR` each task's fine-tuned classifier (the state chosen on val) is
kept in DIR/TASK/ and DIR/stance/TARGET/ beside the run's tokenizer, and `tweetlm classify DIR --task TASK` labels
posts with it (finetune.py's save_classifier, classify.py).
"""

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tweetlm.errors import UserError, check
from tweetlm.eval.metrics import irony_f1, macro_f1, stance_f1

TASKS = ("emoji", "emotion", "hate", "irony", "offensive", "stance")
STANCE_TARGETS = ("abortion", "atheism", "climate", "feminist", "hillary")
SPLITS = ("val", "test")
POOLINGS = ("last", "mean")  # what a fine-tuned run's head reads (finetune.py)
METRICS = {"emoji": macro_f1, "emotion": macro_f1, "hate": macro_f1, "irony": irony_f1, "offensive": macro_f1,
           "stance": stance_f1}

# Published scores x 100 on TweetEval's *test* split (sentiment, the seventh task, left out: its train split is
# not in ../shared/data). SVM, FastText, LSTM and RoBERTa-base: the TweetEval paper's results table (Barbieri
# et al., Findings of EMNLP 2020, arxiv.org/abs/2010.12421), the same rows as the leaderboard of
# github.com/cardiffnlp/tweeteval (README). BERTweet (Nguyen et al., EMNLP 2020 demos): that leaderboard.
PUBLISHED = {
    "SVM": {"emoji": 29.3, "emotion": 64.7, "hate": 36.7, "irony": 61.7, "offensive": 52.3, "stance": 67.3},
    "FastText": {"emoji": 25.8, "emotion": 65.2, "hate": 50.6, "irony": 63.1, "offensive": 73.4, "stance": 65.4},
    "LSTM": {"emoji": 24.7, "emotion": 66.0, "hate": 52.6, "irony": 62.8, "offensive": 71.7, "stance": 59.4},
    "RoBERTa-base": {"emoji": 30.9, "emotion": 76.1, "hate": 46.6, "irony": 59.7, "offensive": 79.5, "stance": 68.0},
    "BERTweet": {"emoji": 33.4, "emotion": 79.3, "hate": 56.4, "irony": 82.1, "offensive": 79.5, "stance": 71.2},
}
C_GRID = (0.3, 1.0, 3.0, 10.0)  # the baseline's inverse regularization strengths, tried on val


@dataclass(frozen=True)
class Split:
    texts: list[str]
    labels: np.ndarray | None  # int64 label ids; None where the split comes without labels


@dataclass(frozen=True)
class Dataset:
    """What one classifier sees: a task, or one stance target."""

    task: str
    target: str | None
    labels: tuple[str, ...]  # label names (mapping.txt); a label id is an index into them
    train: Split
    val: Split
    eval: Split  # the split to predict (val itself when val is asked)

    @property
    def name(self) -> str:
        """"emoji", or "stance/abortion": also the prediction file's path, less ".txt"."""
        return f"{self.task}/{self.target}" if self.target else self.task

    def score(self, gold: np.ndarray, pred: np.ndarray) -> float:
        """The task's official metric (for stance, on this target's labels alone)."""
        return METRICS[self.task](gold, pred)


Predictor = Callable[..., np.ndarray]  # predict(dataset, *, seed: int, progress: tqdm) -> [len(dataset.eval.texts)]


@dataclass(frozen=True, kw_only=True)
class TweetEvalConfig:
    data: Path
    out: Path | None = None  # default: RUN/tweeteval-SPLIT, or ./tweeteval-SPLIT without a run
    split: str = "val"
    tasks: tuple[str, ...] = TASKS
    run: Path | None = None  # a language-model run to fine-tune per task (finetune.py), beside the floor baseline
    model: str | None = None  # "tfidf": the floor baseline alone
    max_train_examples: int | None = None  # a seeded sample of each train split, for quick runs
    seed: int = 0
    # fine-tuning a run (finetune.py, whose docstring has the val figures these defaults were chosen by, and why
    # each option is there)
    epochs: int = 6
    lr: float = 1e-3
    batch_size: int = 32
    pooling: str = "last"  # or "mean" over the post's tokens
    layer_decay: float = 1.0  # each block's LR is this times the one above's; 1.0: one LR for all
    tapt_steps: int = 0  # next-token steps on the task's train texts before fine-tuning; 0: none
    save: Path | None = None  # keep each task's classifier chosen on val there, for `tweetlm classify`
    device: str = "auto"  # "auto": cuda when there is one

    def __post_init__(self):
        if self.out is None:
            object.__setattr__(self, "out", (Path(self.run) if self.run else Path()) / f"tweeteval-{self.split}")
        check(self.split in SPLITS, "split", self.split, "choose val or test")
        unknown = sorted(set(self.tasks) - set(TASKS))
        check(bool(self.tasks) and not unknown, "tasks", ",".join(self.tasks),
              f"unknown {','.join(unknown) or '(none given)'}; choose among {','.join(TASKS)}")
        if (self.run is None) == (self.model is None):
            raise UserError("give a RUN folder or --model tfidf, not both and not neither")
        check(self.model in (None, "tfidf"), "model", self.model, "the only built-in model is tfidf")
        check(self.max_train_examples is None or self.max_train_examples >= 1, "max_train_examples",
              self.max_train_examples, "must be at least 1")
        check(self.epochs >= 1, "epochs", self.epochs, "must be at least 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be at least 1")
        check(self.lr > 0, "lr", self.lr, "must be positive")
        check(self.pooling in POOLINGS, "pooling", self.pooling, f"choose {' or '.join(POOLINGS)}")
        check(0 < self.layer_decay <= 1, "layer_decay", self.layer_decay, "must be in (0, 1]; 1.0 is one LR for all")
        check(self.tapt_steps >= 0, "tapt_steps", self.tapt_steps, "must be at least 0 (0: none)")
        check(self.save is None or self.run is not None, "save", str(self.save),
              "keeps a fine-tuned run's classifiers: give a RUN folder")


def tweeteval(cfg: TweetEvalConfig) -> dict:
    """The verb: a run fine-tuned per task (row named after the run's folder) beside the TF-IDF floor (a minute
    or two, most of it emoji's fits: logistic.py); or the floor alone (--model tfidf)."""
    if cfg.run is None:
        return evaluate(cfg, {"tfidf": tfidf_baseline})
    from tweetlm.eval.finetune import finetuner  # torch loads only when a run is fine-tuned

    name = Path(cfg.run).resolve().name
    if name == "tfidf":
        raise UserError(f"{cfg.run}: a run folder named tfidf would share the floor baseline's row; rename it")
    predict = finetuner(cfg.run, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, pooling=cfg.pooling,
                        layer_decay=cfg.layer_decay, tapt_steps=cfg.tapt_steps, save=cfg.save, device=cfg.device)
    result = evaluate(cfg, {name: predict, "tfidf": tfidf_baseline})
    if cfg.save is not None:
        print(f"classifiers: {cfg.save}  (tweetlm classify {cfg.save} --task TASK TEXT...)")
    return result


def evaluate(cfg: TweetEvalConfig, predictors: dict[str, Predictor]) -> dict:
    """Each predictor on each task of cfg: prediction files, official scores where the split has labels, the
    table printed, OUT/scores.json written and returned."""
    datasets = {task: load_task(cfg.data, task, cfg.split, max_train_examples=cfg.max_train_examples, seed=cfg.seed)
                for task in cfg.tasks}  # all read first: a bad file fails before any training
    scores: dict[str, dict[str, float | None]] = {}
    for name, predict in predictors.items():
        scores[name] = {}
        for task, parts in datasets.items():
            preds = []
            for ds in parts:
                with tqdm(desc=f"{name} {ds.name}", file=sys.stderr, disable=None, leave=False) as bar:
                    pred = np.asarray(predict(ds, seed=cfg.seed, progress=bar))
                _check_predictions(pred, ds, name)
                write_predictions(Path(cfg.out) / name, ds.name, pred)
                preds.append(pred)
            golds = [ds.eval.labels for ds in parts]
            labelled = all(g is not None for g in golds)
            scores[name][task] = METRICS[task](np.concatenate(golds), np.concatenate(preds)) if labelled else None
            if labelled:
                print(f"{name} {task}: {100 * scores[name][task]:.1f}", file=sys.stderr)
    result = {"split": cfg.split, "tasks": list(cfg.tasks), "scores": scores,
              "published": {row: {t: s for t, s in tasks.items() if t in cfg.tasks} for row, tasks in PUBLISHED.items()},
              "config": {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
                         for k, v in asdict(cfg).items()}}
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "scores.json").write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(scores, cfg.tasks, cfg.split))
    print(f"predictions: {', '.join(str(Path(cfg.out) / n) for n in predictors)}  scores: {Path(cfg.out) / 'scores.json'}")
    return result


def format_table(scores: dict[str, dict[str, float | None]], tasks: tuple[str, ...], split: str) -> str:
    """Our models' scores (x 100) on `split` above the published test-split rows, each with its mean over `tasks`."""
    def row(name: str, values: list[float | None]) -> str:
        cells = [f"{'-' if v is None else f'{v:.1f}':>{max(len(t), 5)}}" for t, v in zip(tasks, values)]
        mean = f"{np.mean(values):6.1f}" if None not in values else f"{'-':>6}"
        return f"{name:<14}" + " ".join(cells) + mean

    header = f"{'model':<14}" + " ".join(f"{t:>{max(len(t), 5)}}" for t in tasks) + f"{'avg':>6}"
    lines = ["TweetEval, official metrics x 100 (macro-F1; irony: F1 of ironic; stance: mean F1 of against and favor)",
             header, f"-- this run, {split} split"]
    lines += [row(name, [None if s[t] is None else 100 * s[t] for t in tasks]) for name, s in scores.items()]
    lines.append("-- published, test split (Barbieri et al. 2020; BERTweet: TweetEval leaderboard)")
    lines += [row(name, [s[t] for t in tasks]) for name, s in PUBLISHED.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------- the files


def load_task(data: Path, task: str, split: str, *, max_train_examples: int | None = None, seed: int = 0) -> list[Dataset]:
    """The task's datasets (five for stance, one per target); train and val must have labels, `split` may not."""
    data = Path(data)
    if not (data / task).is_dir() and (data / "datasets" / task).is_dir():  # a checkout of TweetEval's repository
        data = data / "datasets"
    if not (data / task).is_dir():
        raise UserError(f"no {task}/ in {data}: pass the folder laid out as TweetEval's datasets/ (emoji/, emotion/, "
                        "... stance/), e.g. ../shared/data/tweeteval or one from `tweetlm data fetch`")
    labels = _mapping(data / task / "mapping.txt")
    out = []
    for target in STANCE_TARGETS if task == "stance" else (None,):
        folder = data / task / target if target else data / task
        train, val = (_split(folder, s, len(labels), labels_required=True) for s in ("train", "val"))
        if max_train_examples is not None and max_train_examples < len(train.texts):
            keep = np.sort(np.random.default_rng(seed).choice(len(train.texts), max_train_examples, replace=False))
            train = Split([train.texts[i] for i in keep], train.labels[keep])
        test = _split(folder, split, len(labels), labels_required=False) if split != "val" else val
        out.append(Dataset(task, target, labels, train, val, test))
    return out


def write_predictions(folder: Path, name: str, pred: np.ndarray) -> Path:
    """FOLDER/NAME.txt, one label id per line, each line ended by "\\n" (the official script drops what
    follows the last one)."""
    path = Path(folder) / f"{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{int(p)}\n" for p in pred))
    return path


def _lines(path: Path) -> list[str]:
    """A file's lines as the official script reads them: split at "\\n", the empty piece after the last dropped."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; the folder must be laid out as TweetEval's datasets/ "
                        f"({path.parent.name}/{{train,val,test}}_text.txt and _labels.txt)") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    return lines[:-1] if lines[-1] == "" else lines


def _mapping(path: Path) -> tuple[str, ...]:
    """Label names by id from mapping.txt ("0<TAB>anger"; emoji's has a third column, the emoji's name)."""
    rows = [line.split("\t") for line in _lines(path) if line.strip()]
    if [r[0] for r in rows] != [str(i) for i in range(len(rows))] or len(rows) < 2:
        raise UserError(f"{path}: expected lines '0<TAB>name', '1<TAB>name' ... in order, got {rows[:3]}")
    return tuple(r[1] if len(r) > 1 else r[0] for r in rows)


def _split(folder: Path, split: str, n_labels: int, *, labels_required: bool) -> Split:
    text_path, label_path = folder / f"{split}_text.txt", folder / f"{split}_labels.txt"
    if split == "test" and not text_path.exists():
        raise UserError(f"{text_path}: no such file; TweetEval's test split is held back in ../shared/data "
                        "(use --split val there), or point --data at a full copy of TweetEval's datasets/")
    texts = _lines(text_path)
    if not labels_required and not label_path.exists():
        return Split(texts, None)
    raw = _lines(label_path)
    if len(raw) != len(texts):
        raise UserError(f"{text_path} has {len(texts)} lines but {label_path} has {len(raw)}: "
                        "each tweet needs its label id on the same line")
    labels = np.zeros(len(raw), dtype=np.int64)
    for i, value in enumerate(raw):
        if not value.strip().isdigit() or int(value) >= n_labels:
            raise UserError(f"{label_path}:{i + 1}: {value!r} is not a label id of {folder.name} "
                            f"(0..{n_labels - 1}, see mapping.txt)")
        labels[i] = int(value)
    return Split(texts, labels)


def _check_predictions(pred: np.ndarray, ds: Dataset, model: str) -> None:
    n = len(ds.eval.texts)
    assert pred.shape == (n,), f"{model} gave {pred.shape} predictions for {ds.name}'s {n} posts"
    assert np.issubdtype(pred.dtype, np.integer) and (0 <= pred).all() and (pred < len(ds.labels)).all(), \
        f"{model} predicted ids outside 0..{len(ds.labels) - 1} for {ds.name}: {np.unique(pred)}"


# ---------------------------------------------------------------- the floor baseline


def tfidf_baseline(ds: Dataset, *, seed: int, progress: tqdm) -> np.ndarray:
    """TF-IDF word and char n-grams + logistic regression (logistic.py), C chosen on val by the official metric."""
    from tweetlm.artifacts.ngrams import NgramFeatures  # scikit-learn loads only when a model is fit
    from tweetlm.eval.logistic import fit_logistic

    progress.reset(total=len(C_GRID))
    features = NgramFeatures.fit(ds.train.texts)
    x_train, x_val = features(ds.train.texts), features(ds.val.texts)
    best = None  # (val score, C, model)
    for C in C_GRID:
        model = fit_logistic(x_train, ds.train.labels, C=C, seed=seed)
        score = ds.score(ds.val.labels, model.predict(x_val))
        if best is None or score > best[0]:
            best = (score, C, model)
        progress.set_postfix_str(f"C={C:g} val {score:.3f}", refresh=False)
        progress.update()
    progress.set_postfix_str(f"best C={best[1]:g} val {best[0]:.3f}")
    return best[2].predict(x_val if ds.eval is ds.val else features(ds.eval.texts))
