"""Benchmark of `data prepare` and `data tokenize`: posts/s and peak memory per node, locally and on Ray.

    .venv/bin/python bench/data.py --ray                 # issue 13's measurement, 1.05M posts: ~13 minutes on 2 cores
    .venv/bin/python bench/data.py                       # the local path only: ~5 minutes
    .venv/bin/python bench/data.py --scale 0.02 --ray    # a smoke run, 42k posts: ~4 minutes

(The 13 minutes are an estimate from runs at --scale 0.25 on 2 cores shared with other jobs, which took 1.4x the
time they take on an idle machine; there the whole run would take ~17 minutes.)

Input: copy 0 is every TweetEval and XLM-T `*_text.txt` file (102,906 lines) plus every file of
twitter-api-v2/ (API v2 pages and flattened lines, ~2.2k records), as they are. Copy i > 0 prefixes each post's
text with "r{i} " (in the JSON files, every "text" field), a near duplicate of copy 0's for most posts of 6 words
or more (word 3-gram Jaccard (w - 2) / (w - 1) >= 0.8), except one text line in 4, left as it is: an exact
duplicate 100k posts or more earlier. So both dedup stages have work, with copies far apart. 10 copies are 1.05M records. --scale S keeps the first S of each text file's
lines (the API v2 files stay whole).

Runs, each in a fresh process, with near-dup off and on (0.8), on 1 copy (1x) and on all copies:
- prepare on the local path, 1 and 2 workers;
- with --ray, prepare on a fresh Ray cluster of 1 node and of 2 nodes on this machine, started as
  tests/test_data_ray.py starts them (ray.cluster_utils.Cluster; each node 1 CPU and a 200 MB object store, past
  which Ray spills to disk); a fresh cluster per run, so that no run's memory carries into the next;
- tokenizer training (vocab 8192) on the 1x corpus, then tokenize of the all-copies corpus with each of the above
  but Ray on 1 node.
Peak memory per node: the largest, sampled every 0.2 s, sum of PSS (proportional set size: a page shared by n
processes counts 1/n in each, so shared libraries and Ray's shared-memory object store count once) over the
node's process tree. Node 1 is the run's process and its workers, plus the Ray head node's processes (GCS,
raylet and the raylet's workers); node 2 is the second Ray node's raylet and workers. A peak shorter than 0.2 s
can be missed.
Prints a table, issue 13's ratios (Ray 2 nodes / local 2 workers posts/s, target >= 0.8; peak memory per node
all copies / 1 copy, target <= 1.5), then one line of JSON.
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
_STORE_MB = 200  # each Ray node's object store, as in tests/test_data_ray.py
_SAMPLE_S = 0.2  # memory sampling period; a sample of ~20 processes costs a few ms


def make_copies(work: Path, copies: int, scale: float) -> list[Path]:
    """One folder per copy (see the module docstring); returns the folders."""
    texts = sorted((SHARED / "tweeteval").rglob("*_text.txt")) + sorted((SHARED / "xlm-t").rglob("*_text.txt"))
    v2 = sorted((SHARED / "twitter-api-v2").iterdir())
    folders = []
    for i in range(copies):
        folder = work / f"input-scale{scale:g}" / f"copy{i:03d}"
        folders.append(folder)
        if folder.is_dir():
            continue
        folder.mkdir(parents=True)
        tag = f"r{i} " if i else ""
        for n, path in enumerate(texts):
            lines = path.read_text(encoding="utf-8").splitlines()
            lines = lines[:max(1, round(len(lines) * scale))]
            (folder / f"{n:02d}_{path.parent.name}_{path.name}").write_text(
                "".join((tag if k % 4 else "") + line + "\n" for k, line in enumerate(lines)), encoding="utf-8")
        for path in v2:
            (folder / path.name).write_bytes(path.read_bytes().replace(b'"text": "', b'"text": "' + tag.encode()))
    return folders


# ---------------------------------------------------------------- a run: a fresh process, its memory sampled


def run_child(code: str, nodes: list[list[int]], ray: str | None = None) -> tuple[dict, list[float]]:
    """Runs Python `code` in a fresh process, where RAY is `ray`; returns the JSON of its last stdout line and each
    node's peak memory in MB (module docstring). `nodes`: each node's own process ids ([[]]: no Ray); the child
    counts in node 1."""
    with tempfile.TemporaryFile() as err:  # progress bars and warnings, shown only on failure
        proc = subprocess.Popen([sys.executable, "-c", f"RAY = {ray!r}\n{code}"], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=err)
        roots = [[proc.pid, *nodes[0]], *nodes[1:]]
        peaks, done = [0.0] * len(roots), threading.Event()

        def sample() -> None:
            while not done.wait(_SAMPLE_S):
                for i, pids in enumerate(roots):
                    peaks[i] = max(peaks[i], _pss_mb([pid for root in pids for pid in _tree(root)]))

        sampler = threading.Thread(target=sample)
        sampler.start()
        out = proc.stdout.read()
        proc.wait()
        done.set()
        sampler.join()
        err.seek(0)
        assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{code}\n{err.read().decode()[-3000:]}"
    return json.loads(out.decode().strip().splitlines()[-1]), peaks


def _tree(root: int) -> list[int]:
    """`root` and its descendants' process ids."""
    pids = [root]
    for pid in pids:  # the list grows as children are found
        for children in glob.glob(f"/proc/{pid}/task/*/children"):
            try:
                pids += map(int, Path(children).read_text().split())
            except OSError:  # gone meanwhile
                pass
    return pids


def _pss_mb(pids: list[int]) -> float:
    kib = 0
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:  # gone meanwhile
            continue
        kib += next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))
    return kib / 1024


@contextmanager
def ray_cluster(nodes: int) -> Iterator[tuple[str, list[list[int]]]]:
    """A fresh Ray cluster of `nodes` nodes on this machine (module docstring): its address and each node's own
    process ids (its workers are their children)."""
    from ray.cluster_utils import Cluster  # here: Ray is needed with --ray only

    node = {"num_cpus": 1, "object_store_memory": _STORE_MB * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args=node)
    try:
        for _ in range(nodes - 1):
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        yield cluster.address, [[p.process.pid for procs in n.all_processes.values() for p in procs]
                                for n in [cluster.head_node, *cluster.worker_nodes]]
    finally:
        cluster.shutdown()


def run_on(setup: dict, code: str) -> tuple[dict, list[float]]:
    """run_child(code) with RAY the Ray address: None for {"workers": N}, a fresh cluster's for {"nodes": N}."""
    with ray_cluster(setup["nodes"]) if "nodes" in setup else nullcontext((None, [[]])) as (address, nodes):
        return run_child(code, nodes, address)


def name(setup: dict) -> str:
    return "ray {nodes} node(s)".format(**setup) if "nodes" in setup else "local {workers} worker(s)".format(**setup)


def _per_cpu(setup: dict) -> int:
    return setup.get("nodes") or setup["workers"]


def _mb(peaks: list[float]) -> str:
    return " / ".join(f"{mb:,.0f}" for mb in peaks)


def _slug(setup: dict) -> str:
    """"workers2", "nodes1": a setup in folder names."""
    return "".join(f"{k}{v}" for k, v in setup.items())


# ---------------------------------------------------------------- the verbs


def bench_prepare(inputs: list[Path], out: Path, setup: dict, near_dup: float) -> dict:
    result, peaks = run_on(setup, f"""
import json
from tweetlm.data.prepare import PrepareConfig, prepare
r = prepare(PrepareConfig(inputs={tuple(map(str, inputs))!r}, out={str(out)!r}, workers={setup.get("workers", 1)},
                          near_dup_threshold={near_dup}, ray=RAY))
print(json.dumps({{k: r[k] for k in ("read", "kept", "seconds", "dropped")}}))
""")
    posts_per_s = result["read"] / result["seconds"]
    return {"run": name(setup), **setup, "near_dup": near_dup, "posts": result["read"], "kept": result["kept"],
            "dropped": result["dropped"], "seconds": result["seconds"], "posts_per_s": posts_per_s,
            "posts_per_s_per_cpu": posts_per_s / _per_cpu(setup), "peak_mb_per_node": peaks}


def bench_tokenize(corpus: Path, tokenizer: Path, out: Path, setup: dict) -> dict:
    result, peaks = run_on(setup, f"""
import json, time
from pathlib import Path
from tweetlm.tokenizer.shards import TokenizeConfig, tokenize
t0 = time.perf_counter()
index = tokenize(TokenizeConfig(corpus=Path({str(corpus)!r}), tokenizer=Path({str(tokenizer)!r}), out=Path({str(out)!r}),
                                workers={setup.get("workers", 1)}, ray=RAY))
seconds = time.perf_counter() - t0
print(json.dumps({{"tokens": sum(s["tokens"] for shards in index["splits"].values() for s in shards), "seconds": seconds}}))
""")
    return {"run": name(setup), **setup, "tokens": result["tokens"], "seconds": result["seconds"],
            "tokens_per_s": result["tokens"] / result["seconds"], "peak_mb_per_node": peaks}


def train_tokenizer(corpus: Path, out: Path, vocab_size: int) -> None:
    run_child(f"""
from pathlib import Path
from tweetlm.tokenizer.trainer import TokenizerConfig, train_tokenizer
train_tokenizer(TokenizerConfig(corpus=Path({str(corpus)!r}), out=Path({str(out)!r}), vocab_size={vocab_size}))
print("{{}}")
""", [[]])


# ---------------------------------------------------------------- main


def ratios(runs: list[dict], setups: list[dict], sizes: list[str]) -> dict:
    """Issue 13's ratios: Ray 2 nodes / local 2 workers posts/s, and each setup's peak memory per node, all copies
    over 1 copy (the largest over its nodes)."""
    def find(setup: dict, near_dup: float, size: str) -> dict | None:
        return next((r for r in runs if r["run"] == name(setup) and r["near_dup"] == near_dup and r["input"] == size), None)

    out = {}
    for near_dup in (0.0, 0.8):
        ray2, local2 = find({"nodes": 2}, near_dup, sizes[-1]), find({"workers": 2}, near_dup, sizes[-1])
        if ray2 and local2:
            out[f"posts/s ray 2 node(s) / local 2 worker(s), near_dup={near_dup}"] = ray2["posts_per_s"] / local2["posts_per_s"]
        for setup in setups:
            one, full = find(setup, near_dup, sizes[0])["peak_mb_per_node"], find(setup, near_dup, sizes[-1])["peak_mb_per_node"]
            out[f"peak MB per node {sizes[-1]} / {sizes[0]}, {name(setup)}, near_dup={near_dup}"] = \
                max(f / o for f, o in zip(full, one))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=10, help="copies of the shared tweets (10 = 1.05M records)")
    parser.add_argument("--scale", type=float, default=1.0, help="share of each text file's lines in a copy (0.02: a smoke run)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tweetlm-bench-data"), help="scratch folder")
    parser.add_argument("--quick", action="store_true", help="skip the 2-worker and 2-node runs")
    parser.add_argument("--ray", action="store_true", help="also run on Ray clusters of 1 and 2 nodes on this machine")
    args = parser.parse_args()
    assert args.copies >= 2, "--copies must be at least 2 (memory is compared between 1 copy and all)"
    assert 0 < args.scale <= 1, "--scale must be in (0, 1]"
    work = args.work
    t0 = time.perf_counter()
    copies = make_copies(work, args.copies, args.scale)
    print(f"input: {args.copies} copies at scale {args.scale:g} in {copies[0].parent} ({time.perf_counter() - t0:.0f} s "
          "to write)", flush=True)

    def folder(sub: str) -> Path:
        shutil.rmtree(work / sub, ignore_errors=True)
        return work / sub

    setups = [{"workers": 1}, {"workers": 2}] + ([{"nodes": 1}, {"nodes": 2}] if args.ray else [])
    setups = [s for s in setups if not (args.quick and _per_cpu(s) == 2)]
    sizes = {"1x": copies[:1], f"{args.copies}x": copies}
    runs = []
    for near_dup in (0.0, 0.8):
        for setup in setups:
            for size, inputs in sizes.items():
                out = folder(f"corpus-nd{near_dup}-{_slug(setup)}-{size}")
                runs.append({"input": size, **bench_prepare(inputs, out, setup, near_dup)})
                print(f"  prepare {name(setup)} near_dup={near_dup} {size}: {runs[-1]['posts_per_s']:,.0f} posts/s, "
                      f"peak MB per node {_mb(runs[-1]['peak_mb_per_node'])}", flush=True)

    tokenizer, corpus = folder("tokenizer"), work / f"corpus-nd0.0-workers1-{args.copies}x"
    train_tokenizer(work / "corpus-nd0.0-workers1-1x", tokenizer, vocab_size=8192)
    tokenize = [bench_tokenize(corpus, tokenizer, folder(f"tokens-{_slug(s)}"), s)
                for s in setups if s != {"nodes": 1}]  # Ray on 2 nodes only: each Ray run is ~1.5 minutes at full size

    print()
    print(f"{'run':<20}{'near-dup':>9}{'input':>6}{'posts':>11}{'seconds':>9}{'posts/s':>10}{'per CPU':>9}"
          f"  peak MB per node")
    for r in runs:
        print(f"{r['run']:<20}{r['near_dup']:>9}{r['input']:>6}{r['posts']:>11,}{r['seconds']:>9.1f}"
              f"{r['posts_per_s']:>10,.0f}{r['posts_per_s_per_cpu']:>9,.0f}  {_mb(r['peak_mb_per_node'])}")
    for t in tokenize:
        print(f"tokenize {t['run']}: {t['tokens']:,} tokens in {t['seconds']:.1f} s = {t['tokens_per_s']:,.0f} tokens/s, "
              f"peak MB per node {_mb(t['peak_mb_per_node'])}")
    targets = ratios(runs, setups, list(sizes))
    for what, ratio in targets.items():
        print(f"{what}: {ratio:.2f}x (target {'>= 0.8' if what.startswith('posts/s') else '<= 1.5'})")
    print(json.dumps({"bench": "data", "cpus": os.cpu_count(), "copies": args.copies, "scale": args.scale,
                      "prepare": runs, "ratios": targets, "tokenize": tokenize}))


if __name__ == "__main__":
    main()
