"""The Ray session of a `--ray [ADDRESS]` run (`data prepare`, `data tokenize`): connect, run, disconnect.

ADDRESS is Ray's own: "local" (what a bare `--ray` means: a Ray started for this run and stopped after it),
"auto" (the cluster this machine joined with `ray start`), "HOST:PORT" (a head node's GCS, as `ray start --head`
prints it) or "ray://HOST:PORT" (Ray Client, from outside the cluster). Ray is imported here, when a run asks for
it: the default path never loads it (tests/test_imports.py).

Faults: Ray reruns a task whose worker or node dies (its default 3 retries) and rebuilds lost objects from their
tasks; every task here is a pure function of its inputs and rewrites its outputs whole, so a rerun gives the same
output. What Ray cannot redo becomes one line (UserError), as does a UserError raised inside a task.

Every node reads the inputs and writes the outputs itself, so on more than one machine the paths must name the
same files everywhere: absolute paths on a shared file system, or object storage by URL (ray_prepare.py).
"""

import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from tweetlm.errors import UserError


@contextmanager
def ray_session(address: str) -> Iterator:
    """The `ray` module, connected to `address` for the length of the block."""
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install 'tweetlm[ray]'") from None
    _check_reachable(address)
    try:
        # No dashboard: it needs more packages and a port, and a run prints its own progress.
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    except Exception as e:  # noqa: BLE001  ConnectionError for "auto" without a cluster; Ray raises others too
        ray.shutdown()
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--ray {address}: cannot reach a Ray cluster ({why}); start one with `ray start --head`, "
                        "or pass --ray alone for a local one") from None
    try:
        yield ray
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, UserError):  # a task's UserError: its one line, not Ray's traceback
            raise e.cause from None
        raise
    except (ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError, ray.exceptions.WorkerCrashedError,
            ray.exceptions.OwnerDiedError) as e:  # what Ray could not redo after its own retries
        why = str(e).strip().splitlines()[0]
        raise UserError(f"--ray {address}: the cluster lost work it could not redo ({type(e).__name__}: {why}); "
                        "rerun the command, which replaces the partial output") from None
    finally:
        ray.shutdown()


def _check_reachable(address: str) -> None:
    """A HOST:PORT address that takes no TCP connection is a UserError within seconds; Ray itself retries for
    minutes (measured: over 3 minutes for HOST:PORT, 30 s for ray://)."""
    if address in ("local", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray {address}: not an address; give auto, ray://HOST:PORT or HOST:PORT, "
                        "or nothing for a local Ray")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise UserError(f"--ray {address}: cannot reach a Ray cluster there ({e.strerror or e}); start one with "
                        "`ray start --head`, or pass --ray alone for a local one") from None


def cluster_cpus(ray) -> int:
    """The cluster's CPUs: the number of partitions of a shuffle and of tasks in flight."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
