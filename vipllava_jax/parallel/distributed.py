"""Multi-host (multi-process) start-up: one process per host (or per GPU), all running the same command.

`initialize()` wraps ``jax.distributed.initialize``:

* explicit: ``initialize("10.0.0.1:1234", num_processes=4, process_id=i)`` (CLI: ``--coordinator``,
  ``--num-processes``, ``--process-id``), e.g. several GPU nodes started by hand or by a launcher;
* automatic: with no arguments on a Cloud TPU VM pod slice, under SLURM (``srun``), Open MPI (``mpirun``)
  or Kubernetes, or with ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` set,
  JAX finds the coordinator and this process's id itself;
* otherwise (one process on one machine) it does nothing.

It must run before anything touches a JAX device (jax.devices(), any array). After it, ``jax.devices()``
lists every device of every process; `parallel.make_mesh` builds the mesh over all of them and
`load_pretrained(..., mesh=mesh)` reads on each process only the slices its devices hold.
"""
from __future__ import annotations

import argparse
import os
import pickle
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from .mesh import make_mesh

try:  # private APIs: without them no cluster detection / the public is_initialized only
    from jax._src import clusters as _clusters
except Exception:  # noqa: BLE001
    _clusters = None
try:
    from jax._src import distributed as _jax_distributed
except Exception:  # noqa: BLE001
    _jax_distributed = None

_ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def cluster_detected() -> str | None:
    """Name of the cluster environment JAX would auto-detect (TPU pod, SLURM, Open MPI, K8s), or None."""
    if any(os.environ.get(v) for v in _ENV_VARS):
        return "JAX_* environment variables"
    try:
        for env in _clusters.ClusterEnv._cluster_types:
            if not getattr(env, "opt_in_only_method", False) and env.is_env_present():
                return env.__name__
    except Exception:  # noqa: BLE001 - private API; no detection then
        pass
    return None


def is_initialized() -> bool:
    fn = getattr(jax.distributed, "is_initialized", None)
    if fn is not None:
        return bool(fn())
    return _jax_distributed.global_state.client is not None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: int | Sequence[int] | None = None, *,
               cpu_collectives: str | None = "gloo", initialization_timeout: int = 300) -> bool:
    """Join the multi-process job. Returns True when running multi-process (or already initialized).

    With any of the explicit arguments, coordinator_address, num_processes and process_id are passed on
    (JAX auto-detects the ones left out where a cluster environment provides them). With none of them,
    ``jax.distributed.initialize()`` is called only where a cluster environment is detected.
    ``cpu_collectives``: the CPU backend's cross-process collectives ("gloo"; "mpi" needs an MPI build),
    needed when the devices are CPUs (tests, CPU clusters); ignored by TPU/GPU."""
    if is_initialized():
        return True
    explicit = any(a is not None for a in (coordinator_address, num_processes, process_id, local_device_ids))
    if not explicit and cluster_detected() is None:
        return False
    if explicit and coordinator_address is None and cluster_detected() is None:
        raise ValueError("Multi-process run: --coordinator HOST:PORT is required (the address of process 0, "
                         "the same on every process) unless a cluster environment (TPU pod, SLURM, MPI) "
                         "provides it")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} is out of range for --num-processes {num_processes} "
                         f"(ids are 0 .. {num_processes - 1})")
    if cpu_collectives:
        try:
            jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
        except Exception:  # noqa: BLE001 - older/newer jax without this option
            pass
    if isinstance(local_device_ids, int):
        local_device_ids = [local_device_ids]
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids,
                               initialization_timeout=initialization_timeout)
    return True


def _device_ids(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--local-device-ids wants comma-separated integers, got {s!r}") from None


def add_distributed_args(parser: argparse.ArgumentParser, *, mesh: bool = True) -> argparse.ArgumentParser:
    """Add --coordinator, --num-processes, --process-id, --local-device-ids and (mesh=True) --mesh, as an
    argument group, to a (sub)parser. Then: `initialize_from_args(args)` first thing, `mesh_from_args(args,
    config)` once the config is known."""
    g = parser.add_argument_group(
        "devices and hosts", "Multi-host: run the same command on every host. TPU pod slices, SLURM and MPI "
                             "need no flags (detected automatically); elsewhere give --coordinator, "
                             "--num-processes and --process-id.")
    if mesh:
        g.add_argument("--mesh", default="auto",
                       help='device mesh over all devices of all hosts, e.g. "data=2,fsdp=2,tensor=2"; sizes '
                            'must multiply to the device count. "auto" (default): every device on fsdp')
    g.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                   help="address of process 0's coordinator service, the same on every process")
    g.add_argument("--num-processes", type=int, default=None, metavar="N", help="total number of processes")
    g.add_argument("--process-id", type=int, default=None, metavar="I", help="this process's id, 0 .. N-1")
    g.add_argument("--local-device-ids", type=_device_ids, default=None, metavar="IDS",
                   help="comma-separated local accelerator ids this process uses (default: all)")
    return parser


def initialize_from_args(args: argparse.Namespace) -> bool:
    """Call `initialize` with the flags `add_distributed_args` added. Call it before any JAX device use."""
    return initialize(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                      getattr(args, "process_id", None), getattr(args, "local_device_ids", None))


def mesh_from_args(args: argparse.Namespace, config=None):
    """The Mesh for --mesh over every process's devices, checked against the model config."""
    return make_mesh(getattr(args, "mesh", None) or "auto", config)


def is_main_process() -> bool:
    """True on process 0: print and write files there only."""
    return jax.process_index() == 0


class BroadcastChannel:
    """Process 0 sends Python objects to every other process, in order: the multi-host serving engine's plans
    (`generation.engine.Engine` with ``channel=``). Each message is pickled (all processes run this package and
    trust process 0) and goes as two device broadcasts (``multihost_utils.broadcast_one_to_all``): its length,
    then its bytes padded to a power of two (few shapes: few compiles). Every process must call in the same
    order: process 0 `send`, the others `recv`."""

    MIN_BYTES = 256

    def send(self, obj) -> None:
        data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
        size = max(self.MIN_BYTES, 1 << (len(data) - 1).bit_length())
        buf = np.zeros(size, np.uint8)
        buf[:len(data)] = data
        multihost_utils.broadcast_one_to_all(np.array([len(data), size], np.int32))
        multihost_utils.broadcast_one_to_all(buf)

    def recv(self):
        n, size = (int(x) for x in multihost_utils.broadcast_one_to_all(np.zeros(2, np.int32)))
        buf = np.asarray(multihost_utils.broadcast_one_to_all(np.zeros(size, np.uint8)))
        return pickle.loads(buf[:n].tobytes())
