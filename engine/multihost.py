"""Several processes (hosts) running one engine over one global mesh: start-up, and the plan channel for serving.

Multi-controller JAX runs the same program in every process: each process holds its shards of the weights and
cache, and every compiled step must be entered by all processes, in the same order, with the same inputs.

- Offline batch: every process runs the same job over the same inputs (`scripts/generate.py`); only process 0 writes.
- Serving: process 0 owns the gRPC front and the `Scheduler`; its `plan_hook` is a `PlanBroadcaster`, which sends
  each step's `StepPlan` to the others before the step runs. Every other process calls `run_follower(engine)`, which
  receives the plans and replays them with the same engine calls in the same order as `Scheduler.execute`, until the
  leader sends the stop message (`PlanBroadcaster.stop()`).

The channel is `multihost_utils.broadcast_one_to_all` (a collective over all devices, so it is as fast as the
interconnect and keeps all processes in lock step): a fixed-shape header (the payload length, or -1 to stop), then
the pickled plan padded to a power-of-two bucket, so only a handful of broadcast shapes ever compile. Pickle is safe
here: both ends are the same program of the same job, and nothing from outside the job enters the channel.

Failure: when a process dies, the others are blocked in a collective (or will be at the next step). The JAX
coordination service notices the missing heartbeats after `heartbeat_timeout_seconds` and terminates every surviving
process (SIGABRT) with "Terminating process because the JAX distributed service detected fatal errors ... tasks are
unhealthy (stopped sending heartbeats)". A process group serving together is only useful whole, so failing all of it
fast, for the orchestrator to restart, is the intended behaviour; `initialize_distributed` keeps that timeout short.
"""

from __future__ import annotations

import logging
import pickle
import random

import jax
import numpy as np
from jax.experimental import multihost_utils

from engine.engine import Engine
from engine.scheduler import Executor, StepPlan

log = logging.getLogger(__name__)

_STOP = -1
_MIN_BUCKET = 256


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_seconds: int = 20,
    initialization_timeout: int = 300,
) -> None:
    """Joins this process to the job (`jax.distributed.initialize`); call before anything touches a device.

    With all three arguments None, JAX reads the cluster environment (TPU pods, SLURM, ...). num_processes == 1 is a
    single-process run: nothing to join, nothing done. A process that stops sending heartbeats for
    `heartbeat_timeout_seconds` makes every other process terminate (see the module docstring).
    """
    if num_processes == 1:
        return
    given = (coordinator_address, num_processes, process_id)
    if any(v is None for v in given) and any(v is not None for v in given):
        raise ValueError(
            "multi-process runs need all of coordinator_address, num_processes and process_id "
            "(or none of them, to read the TPU pod / cluster environment)"
        )
    # XLA:CPU needs a collectives implementation to reach devices of other processes; TPU/GPU ignore this setting
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        initialization_timeout=initialization_timeout,
    )
    log.info(
        "process %d of %d joined; %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def is_leader() -> bool:
    """Process 0: the one that writes outputs and, when serving, owns the front end and the scheduler."""
    return jax.process_index() == 0


def shared_seed() -> int:
    """A random seed drawn by process 0 and broadcast, so every process samples the same tokens."""
    mine = np.array([random.getrandbits(31)], np.int32)
    return int(multihost_utils.broadcast_one_to_all(mine)[0])


def _bucket(n: int) -> int:
    size = _MIN_BUCKET
    while size < n:
        size *= 2
    return size


def _broadcast(header: int, payload: bytes = b"") -> None:
    multihost_utils.broadcast_one_to_all(np.array([header], np.int32))
    if header > 0:
        buf = np.zeros(_bucket(header), np.uint8)
        buf[:header] = np.frombuffer(payload, np.uint8)
        multihost_utils.broadcast_one_to_all(buf)


def receive_plan() -> StepPlan | None:
    """The next plan process 0 sent, or None for the stop message (followers only)."""
    header = int(multihost_utils.broadcast_one_to_all(np.zeros(1, np.int32))[0])
    if header == _STOP:
        return None
    buf = np.asarray(multihost_utils.broadcast_one_to_all(np.zeros(_bucket(header), np.uint8)))
    return pickle.loads(buf[:header].tobytes())


class PlanBroadcaster:
    """The leader's `Scheduler(plan_hook=...)`: sends every plan to the followers before it runs, returns it as is."""

    def __init__(self) -> None:
        if not is_leader():
            raise RuntimeError(f"only process 0 broadcasts plans; process {jax.process_index()} must run_follower")
        self.stopped = False

    def __call__(self, plan: StepPlan) -> StepPlan:
        if self.stopped:
            raise RuntimeError("the followers were already told to stop; no more steps can run")
        if jax.process_count() > 1:
            payload = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)
            _broadcast(len(payload), payload)
        return plan

    def stop(self) -> None:
        """Tells every follower to return from `run_follower` (call once, after the last step)."""
        if not self.stopped and jax.process_count() > 1:
            _broadcast(_STOP)
        self.stopped = True


def run_follower(engine: Engine) -> int:
    """Replays process 0's plans on this process until the stop message; returns the number of steps replayed.

    Call it where the leader constructs its `Scheduler` (both allocate the decode state at that point).
    """
    if is_leader():
        raise RuntimeError("process 0 leads (Scheduler with a PlanBroadcaster); run_follower is for the others")
    engine.reset()
    executor = Executor(engine)  # the same calls the leader's scheduler makes, through the same code
    steps = 0
    while (plan := receive_plan()) is not None:
        executor.run(plan)
        steps += 1
    log.info("follower %d stopped after %d steps", jax.process_index(), steps)
    return steps
