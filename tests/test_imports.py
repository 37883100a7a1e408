"""Imports run one way (DESIGN.md, "The pipeline"): a stage imports only stages before it and the artifacts layer
below them all, so serving a model never loads the trainer and the model never depends on a later stage.
Read from the source (every import statement, those inside functions too), so a back-edge fails here."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tweetlm"

# Lower imports nothing higher; stages on one level import none of each other. Base modules (errors, spec,
# device) hold no stage's code; the artifacts layer holds the files stages hand each other (docs/CONTRACTS.md).
LEVELS = {
    "base": 0, "artifacts": 1, "data": 2, "tokenizer": 3, "model": 4, "train": 5,
    "eval": 6, "infer": 6, "plan": 6, "search": 7, "serve": 8, "cli": 9,
}
BASE = {"errors", "spec", "device", "__init__"}
TOP = {"cli", "demo", "__main__"}  # the verbs: they may import every stage


def _stage(module: str) -> str:
    """tweetlm.data.prepare -> data; tweetlm.errors -> base; tweetlm.cli -> cli."""
    part = module.split(".")[1] if "." in module else "__init__"
    return "base" if part in BASE else "cli" if part in TOP else part


def _imports() -> dict[str, set[str]]:
    """{module: the tweetlm modules it imports anywhere in its source}."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tweetlm"):
                # `from tweetlm.serve import schemas` imports tweetlm.serve.schemas
                targets |= {f"{node.module}.{a.name}" if (PACKAGE.parent / node.module.replace(".", "/") / f"{a.name}.py").is_file()
                            else node.module for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("tweetlm")}
        found[module] = targets
    return found


def _third_party(module: str) -> set[str]:
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.is_file():
        path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
    return names


def test_every_stage_imports_only_earlier_stages():
    back_edges = []
    for module, targets in _imports().items():
        stage = _stage(module)
        assert stage in LEVELS, f"{module}: stage {stage!r} has no level in this test; add it to LEVELS"
        for target in targets:
            other = _stage(target)
            if other != stage and LEVELS[other] >= LEVELS[stage]:
                back_edges.append(f"{module} ({stage}) imports {target} ({other})")
    assert not back_edges, "imports against the pipeline's direction:\n" + "\n".join(sorted(back_edges))


def test_only_train_and_the_verbs_import_the_trainer():
    importers = {module for module, targets in _imports().items() for t in targets if _stage(t) == "train"}
    assert {_stage(m) for m in importers} <= {"train", "cli"}, sorted(m for m in importers if _stage(m) not in ("train", "cli"))


def test_serving_loads_neither_the_trainer_nor_pyarrow():
    """What `tweetlm serve` can import, lazily too: no tweetlm.train module and no pyarrow (a corpus reader)."""
    graph, seen, todo = _imports(), set(), ["tweetlm.serve.server"]
    while todo:
        module = todo.pop()
        if module not in seen and module in graph:
            seen.add(module)
            todo += graph[module]
    assert not {m for m in seen if _stage(m) == "train"}, sorted(m for m in seen if _stage(m) == "train")
    assert not [m for m in seen if "pyarrow" in _third_party(m)], [m for m in seen if "pyarrow" in _third_party(m)]
    # and at run time, through third-party packages too
    code = ("import sys, tweetlm.serve.server; "
            "print(sorted(m for m in sys.modules if m.startswith(('pyarrow', 'tweetlm.train'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", loaded


def test_the_default_data_path_never_imports_ray(tmp_path):
    """Ray is an extra for `--ray` runs: only ray_cluster.py imports it, inside ray_session, and a default
    `data prepare` + `data tokenize` (processes, one machine) never loads it."""
    assert {m for m in _imports() if "ray" in _third_party(m)} == {"tweetlm.data.ray_cluster"}
    posts = Path(__file__).resolve().parents[2] / "shared" / "data" / "tweeteval" / "irony" / "val_text.txt"
    code = ("import sys; from tweetlm.cli import main; "
            f"assert main(['data', 'prepare', {str(posts)!r}, '--out', {str(tmp_path / 'c')!r}, '--workers', '2']) == 0; "
            f"assert main(['tokenizer', 'train', {str(tmp_path / 'c')!r}, '--vocab-size', '300', '--out', {str(tmp_path / 't')!r}]) == 0; "
            f"assert main(['data', 'tokenize', {str(tmp_path / 'c')!r}, '--tokenizer', {str(tmp_path / 't')!r}, "
            f"'--out', {str(tmp_path / 'k')!r}, '--workers', '2']) == 0; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip().splitlines()[-1] == "[]", loaded
