"""examples/train.sbatch under a real Slurm: scripts/slurm-local.sh starts a cluster of one node, this machine
(munged, slurmctld, slurmd), the test submits the sbatch file as a user does (srun starting one torchrun on the
node, 2 gloo processes on CPU), requeues the job after its first checkpoint, as a preemption would, and checks that
the script started again, resumed the run from its last checkpoint and finished it.

Needs Debian's slurmctld, slurmd, slurm-client and munge (`make test` installs them); skipped without them. The
daemons run as the user running the tests. ~35 s on 2 CPU cores, 5 of them the wait Slurm imposes on a requeued job."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY, _free_port, _records

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "scripts" / "slurm-local.sh"
SBATCH = ROOT / "examples" / "train.sbatch"
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # where Debian puts the daemons
MISSING = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol") if shutil.which(b, path=SBIN) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"Slurm is not installed ({', '.join(MISSING)} not found): "
                                "apt-get install slurmctld slurmd slurm-client munge, as `make test` does")

# The requeue comes at the first checkpoint, ~0.2 s after it: 200 steps (~0.03 s each here) leave the first start
# of the job ~5 s of steps it cannot finish before.
STEPS, EVERY = 200, 10
SETTINGS = {**TINY, "checkpoint.every": EVERY, "eval.every": STEPS, "eval.samples_every": STEPS, "eval.samples": 1}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The environment that points Slurm's commands at a one-node cluster running on this machine."""
    state = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", CLUSTER, "start", state], check=False, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
    finally:
        stopped = subprocess.run(["bash", CLUSTER, "stop", state], check=False, capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def _job(env: dict, job: str) -> dict:
    """`scontrol show job`'s fields: JobState, Restarts, ExitCode ..."""
    shown = subprocess.run(["scontrol", "show", "job", "--oneliner", job], env=env, capture_output=True, text=True, check=True)
    return dict(field.split("=", 1) for field in shown.stdout.split() if "=" in field)


ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _wait(condition, what: str, log: Path, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"{what} after {timeout} s; the job's log:\n" + (
            log.read_text()[-4000:] if log.exists() else "(none)")
        time.sleep(0.1)
    return result


def test_requeued_job_resumes_from_its_checkpoint(cluster, small_tokens, small_tokenizer, tmp_path):
    run, log = tmp_path / "run", tmp_path / "job.log"
    env = {**cluster, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{cluster['PATH']}",  # torchrun: the venv's
           "TWEETLM_NPROC_PER_NODE": "2", "TWEETLM_RDZV_PORT": str(_free_port())}
    train_args = ["--tokens", small_tokens, "--tokenizer", small_tokenizer, "--out", run, "--preset", "tiny",
                  "--steps", str(STEPS), "--device", "cpu",
                  *(f"--set={k}={v}" for k, v in SETTINGS.items() if k not in ("model.preset", "steps"))]
    # The file's #SBATCH lines ask for 4 nodes of 8 GPUs; on the command line, as users override them, one CPU node.
    submitted = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2",
                                "--time=10", f"--output={log}", f"--chdir={tmp_path}", SBATCH, *train_args],
                               env=env, check=False, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip()

    first = _wait(lambda: sorted((run / "checkpoints").glob("step-*")), "no checkpoint", log)[0]
    assert _job(env, job)["JobState"] == "RUNNING", "the job ended before it could be requeued: raise STEPS"
    subprocess.run(["scontrol", "requeue", job], env=env, check=True, timeout=60)

    done = _wait(lambda: (s := _job(env, job))["JobState"] in ENDED and s, "the requeued job did not end", log, timeout=180)
    output = log.read_text()
    ended = {k: done[k] for k in ("JobState", "ExitCode", "Restarts")}
    assert ended == {"JobState": "COMPLETED", "ExitCode": "0:0", "Restarts": "1"}, f"{ended}; the job's log:\n{output[-4000:]}"

    # Two starts of the script in the log (--open-mode=append): the first a new run, the second resuming it.
    starts = [line for line in output.splitlines() if line.startswith("train.sbatch: job")]
    assert [("(restart 0)" in s, s.endswith("(resuming)")) for s in starts] == [(True, False), (False, True)], starts
    resumed = json.loads((run / "env.json").read_text())
    assert resumed["processes"] == 2 and "--resume" in resumed["argv"]
    resumed_at = int(Path(resumed["resumed_from"]).name.removeprefix("step-"))
    assert resumed_at >= int(first.name.removeprefix("step-")) and resumed_at % EVERY == 0
    assert f"resumed from {resumed['resumed_from']} (step {resumed_at})" in output
    # Steps go on from the checkpoint: each step once in metrics.jsonl (the second start dropped what the first
    # logged after its checkpoint), the last one the last step asked for.
    assert [r["step"] for r in _records(run) if "loss" in r] == list(range(1, STEPS + 1))
    assert (run / "checkpoints" / f"step-{STEPS:06d}").is_dir()
