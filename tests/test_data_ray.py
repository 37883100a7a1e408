"""`data prepare --ray` and `data tokenize --ray` on a real 2-node Ray cluster on this machine: the same corpus,
report counts and token bytes as the local path, duplicates found however far apart, clear errors."""

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from ray.cluster_utils import Cluster  # Ray is a test dependency: pyproject's [test] pulls [ray]
from test_data_prepare import _exact_lsh  # what LSH with unbounded memory keeps

from tweetlm.cli import main
from tweetlm.data.corpus import SPLITS
from tweetlm.data.dedup import MinHashBands
from tweetlm.data.prepare import PrepareConfig, prepare
from tweetlm.data import ray_prepare
from tweetlm.data.ray_prepare import _mark
from tweetlm.tokenizer.shards import TokenizeConfig, tokenize

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
V2 = SHARED / "twitter-api-v2"
# What differs between the two paths' reports by design: timing, the run's own config, and the local index's size.
_NOT_COUNTS = ("seconds", "posts_per_s", "config", "near_dup_index_bytes")


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes of one CPU each (a head and a worker, each its own raylet and object store): tasks of one
    stage run on both, and objects cross between their stores as they would between machines."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 200 * 2**20})
    c.add_node(num_cpus=1, object_store_memory=200 * 2**20)
    c.wait_for_nodes()
    yield c.address
    c.shutdown()


def _prepare(out: Path, inputs, **kw) -> dict:
    return prepare(PrepareConfig(inputs=tuple(str(i) for i in inputs), out=out, **kw))


def _rows(corpus: Path) -> dict[str, list[dict]]:
    """Each split's rows, in the order readers read them (shards by name)."""
    return {s: [r for f in sorted((corpus / s).glob("*.parquet")) for r in pq.read_table(f).to_pylist()] for s in SPLITS}


def _assert_same(local: tuple[Path, dict], on_ray: tuple[Path, dict]) -> None:
    (a, report_a), (b, report_b) = local, on_ray
    assert _rows(a) == _rows(b)
    assert {k: v for k, v in report_a.items() if k not in _NOT_COUNTS} == \
           {k: v for k, v in report_b.items() if k not in _NOT_COUNTS}
    assert json.loads((b / "report.json").read_text()) == report_b


def test_shared_data_gives_the_local_corpus(cluster, tmp_path):
    """API v2 (malformed line, empty file, edits, reposts, near copies), TweetEval and XLM-T, near-dup and the
    top-author drop on."""
    inputs = (V2, SHARED / "tweeteval/irony", SHARED / "xlm-t/spanish", SHARED / "xlm-t/hindi")
    kw = {"drop_top_authors": 0.01, "near_dup_threshold": 0.8}
    local = tmp_path / "local", _prepare(tmp_path / "local", inputs, **kw)
    on_ray = tmp_path / "ray", _prepare(tmp_path / "ray", inputs, ray=cluster, **kw)
    _assert_same(local, on_ray)
    report = on_ray[1]
    assert {"malformed", "duplicate", "near_duplicate", "top_author"} <= set(report["dropped"])
    assert {(Path(m["file"]).name, m["line"]) for m in report["malformed_examples"]} == \
           {("streaming_output_with_error.jsonl", 8), ("empty.json", 0)}
    assert len(list((tmp_path / "ray/train").glob("part-*.parquet"))) > 1  # one shard set per input file


def test_duplicates_far_apart_across_files(cluster, tmp_path, monkeypatch):
    """Exact and near copies of the first file's posts, 45,000 posts later in another file. The Ray path drops
    what LSH with unbounded memory drops (dedup.py's rule, on the posts past exact dedup in input order), so more
    than the local path's 1 MB index, which forgets posts ~15,000 back, and never a post without an earlier copy.
    (Here even the default 128 MB index forgets one post of 42,000 that has an earlier near copy.) The shuffle
    is cut into 5 partitions (at most 10,000 posts' keys each), as a large input is, more than the cluster's CPUs,
    and fed by groups of files (10,000 posts each), as a large input's are."""
    monkeypatch.setattr(ray_prepare, "PART_POSTS", 10_000)
    monkeypatch.setattr(ray_prepare, "GROUP_POSTS", 10_000)
    posts = (SHARED / "tweeteval/emotion/train_text.txt").read_text(encoding="utf-8").splitlines()[:400]
    filler = (SHARED / "tweeteval/emoji/train_text.txt").read_text(encoding="utf-8").splitlines()
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "00_first.txt").write_text("\n".join(posts) + "\n", encoding="utf-8")
    for i in range(4):  # the filler in 4 files, so the shuffle gathers keys from several tasks
        (inputs / f"0{i + 1}_filler.txt").write_text("\n".join(filler[i::4]) + "\n", encoding="utf-8")
    copies = posts[:100] + [p + " indeed" for p in posts[100:300]]  # exact, then one word more (Jaccard ~0.9)
    (inputs / "09_copies.txt").write_text("\n".join(copies) + "\n", encoding="utf-8")
    copies_file = str(inputs / "09_copies.txt")

    on_ray = _prepare(tmp_path / "ray", [inputs], ray=cluster)
    small = _prepare(tmp_path / "small", [inputs], near_dup_mb=1)
    _prepare(tmp_path / "exact", [inputs], near_dup_threshold=0)
    files = sorted(p.name for p in inputs.iterdir())  # the input order: a folder's files sorted
    rows = sorted((r for rows in _rows(tmp_path / "exact").values() for r in rows),
                  key=lambda r: (files.index(Path(r["source"]).name.rpartition(":")[0]), int(r["source"].rpartition(":")[2])))
    first = _exact_lsh(MinHashBands(0.8, seed=0)([r["clean_text"] for r in rows]))
    expected = {r["source"] for r, keep in zip(rows, first) if keep}

    kept_ray = {r["source"] for rows in _rows(tmp_path / "ray").values() for r in rows}
    kept_small = {r["source"] for rows in _rows(tmp_path / "small").values() for r in rows}
    assert kept_ray == expected and kept_ray < kept_small
    assert on_ray["invariant_ok"] and (on_ray["read"], on_ray["by_source"].keys()) == (small["read"], small["by_source"].keys())
    far, missed = on_ray["by_source"][copies_file]["dropped"], small["by_source"][copies_file]["dropped"]
    assert far["duplicate"] == missed["duplicate"] > 90  # exact dedup forgets nothing on either path
    assert far["near_duplicate"] > 150 and missed.get("near_duplicate", 0) < far["near_duplicate"] / 2


def test_near_duplicates_are_the_first_of_each_bucket_not_of_each_component():
    """A~B in band 0 and B~C in band 1, in the order A, C, B: only B has a near copy before it. Components of the
    pairs would drop C as well; the local path keeps it, and so does the Ray path."""
    a, c, b = 0, 1, 2  # rows of file 0, in input order
    #                  A: text, band 0, band 1   C: text, band 0, band 1   B: text, band 0, band 1
    band = np.array([-1, 0, 1, -1, 0, 1, -1, 0, 1], np.int16)
    key = np.array([11, 7, 8, 12, 5, 9, 13, 7, 9], np.uint64)
    order = np.array([a, a, a, c, c, c, b, b, b], np.int64)
    (hashes, posts), (exact_rows, near_rows) = _mark(1, (band, key, order))
    assert (hashes, posts) == (3, 3) and exact_rows.tolist() == [] and set(near_rows.tolist()) == {b}


def test_tokenize_on_ray_writes_the_same_bytes(cluster, small_corpus, small_tokenizer, tmp_path):
    kw = {"corpus": small_corpus, "tokenizer": small_tokenizer, "shard_tokens": 5000}
    local = tokenize(TokenizeConfig(out=tmp_path / "local", **kw))
    on_ray = tokenize(TokenizeConfig(out=tmp_path / "ray", ray=cluster, **kw))
    assert local == on_ray and len(local["splits"]["train"]) > 1
    names = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ray").iterdir())
    for name in names:
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name


def test_file_urls_in_and_out(cluster, tmp_path, capsys):
    """Inputs and --out as URLs (pyarrow.fs, as s3:// and gs:// would be): the posts and counts of the same files
    given as paths, with the URLs as their sources and names."""
    french = SHARED / "xlm-t/french"  # its two label files are skipped
    local = _prepare(tmp_path / "local", [V2 / "withheld.jsonl", french])
    assert main(["data", "prepare", str(V2 / "withheld.jsonl"), f"file://{french}", "--out", f"file://{tmp_path}/ray",
                 "--ray", cluster]) == 0
    on_ray = json.loads((tmp_path / "ray/report.json").read_text())

    def unurl(value):
        return json.loads(json.dumps(value).replace("file://", ""))

    assert unurl(_rows(tmp_path / "ray")) == _rows(tmp_path / "local")
    assert {r["source"].split(":")[0] for rows in _rows(tmp_path / "ray").values() for r in rows} == {"file", str(V2 / "withheld.jsonl")}
    assert {k: unurl(v) for k, v in on_ray.items() if k not in _NOT_COUNTS} == \
           {k: v for k, v in local.items() if k not in _NOT_COUNTS}
    capsys.readouterr()
    assert main(["data", "prepare", f"file://{tmp_path}/missing", "--out", str(tmp_path / "d"), "--ray", cluster]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tweetlm: error: ") and "no such file" in err and len(err.strip().splitlines()) == 1, err


def test_cli_ray_flag_and_its_errors(cluster, small_tokenizer, tmp_path, capsys):
    """--ray ADDRESS from the command line; a missing input, an unreachable address or a URL without --ray is one
    line and exit 2."""
    out = tmp_path / "c"
    assert main(["data", "prepare", str(V2 / "kpop.jsonl"), "--out", str(out), "--ray", cluster]) == 0
    assert json.loads((out / "report.json").read_text())["config"]["ray"] == cluster
    capsys.readouterr()
    for argv in (["data", "prepare", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "d"), "--ray", cluster],
                 ["data", "prepare", str(V2 / "kpop.jsonl"), "--out", str(tmp_path / "d"), "--ray", "127.0.0.1:1"],
                 ["data", "prepare", str(V2 / "kpop.jsonl"), "--out", str(tmp_path / "d"), "--ray", "ray://127.0.0.1:1"],
                 ["data", "tokenize", str(out), "--tokenizer", str(small_tokenizer), "--out", str(tmp_path / "t"),
                  "--ray", "nowhere"],
                 ["data", "prepare", "s3://bucket/posts", "--out", str(tmp_path / "d")],
                 ["data", "prepare", str(V2 / "kpop.jsonl"), "--out", "s3://bucket/corpus"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("tweetlm: error: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "d").exists()  # nothing written before the cluster answers
    shutil.rmtree(out)


def test_a_worker_killed_mid_run_is_redone_to_the_same_corpus(cluster, tmp_path):
    """SIGKILL the first process seen reading an input file (Ray titles it `ray::_read_file`): Ray runs the task
    again (tasks are pure functions of their inputs, shards are rewritten whole), and the corpus is the local one."""
    inputs = (SHARED / "tweeteval/hate/train_text.txt", V2 / "withheld.jsonl")  # the first takes ~1 s to read
    killed = []
    watcher = threading.Thread(target=_kill_first, args=(b"ray::_read_file", killed, time.time() + 60))
    watcher.start()
    try:
        on_ray = _prepare(tmp_path / "ray", inputs, ray=cluster)
    finally:
        killed.append(None)  # stops the watcher if it found nothing
        watcher.join()
    assert killed[0] is not None, "no worker was seen reading a file"
    local = _prepare(tmp_path / "local", inputs)
    _assert_same((tmp_path / "local", local), (tmp_path / "ray", on_ray))


def _kill_first(title: bytes, killed: list, deadline: float) -> None:
    """SIGKILLs the first process whose title starts with `title`, appending its pid to `killed`."""
    while not killed and time.time() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(title):
                    os.kill(int(proc.name), signal.SIGKILL)
                    killed.append(int(proc.name))
                    return
            except OSError:  # gone meanwhile
                continue
        time.sleep(0.01)
