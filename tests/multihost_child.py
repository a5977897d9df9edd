"""One process of the two-process jobs in tests/test_multihost.py (4 forced CPU devices each, gloo collectives).

    python tests/multihost_child.py --mode offline|serve|kill_follower --process_id 0 --port 12345 \
        --checkpoint DIR --out result.json

- offline: both processes run the same batch job over the same prompts (as scripts/generate.py does).
- serve: process 0 drives a Scheduler whose plan_hook broadcasts each plan (requests arrive in two waves, the second
  while the first decodes); process 1 replays the plans with run_follower until the stop message.
- kill_follower: as serve, but the follower kills itself (SIGKILL) after replaying two plans; the leader must then
  fail fast instead of hanging in its next collective.
"""

from __future__ import annotations

import argparse
import json
import os
import signal

from engine.engine import EngineConfig
from engine.load import load_engine
from engine.multihost import (
    PlanBroadcaster,
    initialize_distributed,
    is_leader,
    receive_plan,
    run_follower,
)
from engine.offline import OfflineItem, run_offline
from engine.sampling import SamplingParams
from engine.scheduler import Executor, Request, Scheduler
from sharding.mesh import make_mesh

PROMPTS = [[5, 17, 99, 3, 42], [7] * 11, [200, 3, 9, 60, 61, 62, 63, 2], [33, 34]]
MAX_TOKENS = 10
ENGINE = EngineConfig(num_slots=4, max_seq_len=64, max_prefill_len=16, page_size=32, decode_steps=4, dtype="float32")
HEARTBEAT_TIMEOUT_S = 5


def params() -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)


def offline(engine, tokenizer) -> list[list[int]]:
    items = [OfflineItem(str(i), params(), token_ids=p) for i, p in enumerate(PROMPTS)]
    return [r.token_ids for r in run_offline(Scheduler(engine, tokenizer), items)]


def serve(engine, tokenizer, kill_after: int | None) -> list[list[int]] | None:
    if not is_leader():
        if kill_after is None:
            run_follower(engine)
            return None
        engine.reset()
        executor = Executor(engine)
        for _ in range(kill_after):
            executor.run(receive_plan())
        os.kill(os.getpid(), signal.SIGKILL)
    outs: dict[str, list[int]] = {}
    broadcaster = PlanBroadcaster()
    scheduler = Scheduler(engine, tokenizer, plan_hook=broadcaster, prefills_per_step=2)

    def submit(i: int) -> None:
        sink = lambda o: outs.setdefault(o.request_id, []).extend(o.token_ids)  # noqa: E731
        scheduler.submit(Request(str(i), PROMPTS[i], params(), sink))

    submit(0)
    submit(1)
    scheduler.step()
    scheduler.step()
    submit(2)
    submit(3)
    scheduler.run_until_idle(max_steps=200)
    broadcaster.stop()
    return [outs[str(i)] for i in range(len(PROMPTS))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", required=True, choices=["offline", "serve", "kill_follower"])
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    # read when the CPU backend starts (at the first device use, below), not at import: the parent test imports
    # this module for its constants with its own single device
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    initialize_distributed(
        f"127.0.0.1:{args.port}",
        2,
        args.process_id,
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
        initialization_timeout=60,
    )
    engine, tokenizer = load_engine(args.checkpoint, ENGINE, mesh=make_mesh("data:2,tensor:4"))
    if args.mode == "offline":
        tokens = offline(engine, tokenizer)
    else:
        tokens = serve(engine, tokenizer, kill_after=2 if args.mode == "kill_follower" else None)
    with open(args.out, "w") as f:
        json.dump({"tokens": tokens, "spec": str(engine.params["layer_0"]["wq"].sharding.spec)}, f)


if __name__ == "__main__":
    main()
