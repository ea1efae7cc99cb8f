"""Side by side: the live fan-out of platforms started with different settings, and the bare grpc.aio server.

    .venv/bin/python benchmarks/compare_fanout.py \\
        --variant stored:TUNEFORGE_METRICS_LIVE_FROM_REPORTS=false --variant early --followers 10

Each variant is a platform of its own, started as `tuneforge up` starts it with the variant's environment
on top (NAME or NAME:VAR=VALUE,VAR=VALUE), all at once; then, --rounds times, every variant and the bare
server (bench_control_plane's ceiling) follow one job with --followers streams while --points points are
published at --rate points/s, in the order given and then in reverse, so no variant always runs first.
It prints each run's p50/p99 latency from publish to receipt and the serving process' CPU per delivery,
then the medians. What bench_control_plane measures for the issue's targets, for changes that need a
platform restart (a setting) to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_control_plane as b

from tuneforge_core import subjects


def variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, assignments = text.partition(":")
    env = dict(pair.split("=", 1) for pair in assignments.split(",") if pair)
    if not name or name == "bare":
        raise argparse.ArgumentTypeError(f"a variant needs a name other than 'bare': {text!r}")
    return name, env


async def compare(args: argparse.Namespace, root: Path) -> None:
    bench_args = b.parse_args(["--batch"] if args.batch else [])
    bench_args.fanout_rate = args.rate
    runs: dict[str, b.Running] = {}
    with b.backends([args.backend] * len(args.variant), root) as found:
        if len(found) != len(args.variant):
            raise SystemExit(f"{args.backend} is not reachable")
        try:
            for i, ((name, env), backend) in enumerate(zip(args.variant, found, strict=True)):
                backend.data_dir = root / f"platform-{i}" / "data"
                saved = dict(os.environ)
                os.environ.update(env)
                try:
                    runs[name] = b.start_platform(backend, 1)
                finally:
                    os.environ.clear()
                    os.environ.update(saved)
            first = next(iter(runs.values()))
            ceiling = b.CeilingServer.start(first, b.capture_responses(first, b.unary_requests(first)), root)
            try:
                await rounds(args, bench_args, runs, ceiling, root)
            finally:
                ceiling.stop()
        finally:
            for run in runs.values():
                run.platform.stop()


async def rounds(args: argparse.Namespace, bench_args: argparse.Namespace, runs: dict[str, b.Running],
                 ceiling: b.CeilingServer, root: Path) -> None:
    ncs = {name: await run.nats("compare-fanout") for name, run in runs.items()}
    results: dict[str, list[b.FanoutRun]] = {}
    order = [*runs, "bare"]
    base = 0
    try:
        for round_ in range(args.rounds):
            for name in order if round_ % 2 == 0 else reversed(order):
                base += b.STEP_BASE
                if name == "bare":
                    nc = next(iter(ncs.values()))

                    async def to_bare(job: str, step: int, nc: b.NATS = nc) -> None:
                        payload = b.report([b.point(job, step, stamped=True)])[1]
                        await nc.publish(f"{b.FANOUT_PREFIX}.{job}", payload)

                    job = next(iter(runs.values())).fanout_jobs[0]
                    got = await b.fanout_once(ceiling.address, "", [job], args.followers, args.points, base,
                                              bench_args, to_bare, root, ceiling.process.pid)
                else:
                    run, js = runs[name], ncs[name].jetstream()

                    async def to_platform(job: str, step: int, js: object = js) -> None:
                        event_id, payload = b.report([b.point(job, step, stamped=True)])
                        await js.publish(subjects.worker_metrics(job), payload,  # type: ignore[attr-defined]
                                         headers={"Nats-Msg-Id": event_id})

                    await b.store_hello(run, ncs[name], run.fanout_jobs[:1], base)
                    got = await b.fanout_once(run.address, run.api_key, run.fanout_jobs[:1], args.followers,
                                              args.points, base, bench_args, to_platform, root,
                                              run.services_pid)
                results.setdefault(name, []).append(got)
                b.say(f"round {round_ + 1} {name}: p50 {b.percentile(got.latencies_ms, 0.5):.1f} ms, p99 "
                      f"{b.percentile(got.latencies_ms, 0.99):.1f} ms, {got.cpu_us_per_delivery:.1f} us CPU "
                      f"a delivery, {got.bad_streams} of {got.streams} streams wrong")
    finally:
        for nc in ncs.values():
            await nc.close()
    b.say(f"medians of {args.rounds} rounds, 1 job x {args.followers} followers, {args.points} points at "
          f"{args.rate:g}/s, {args.backend}:")
    for name in order:
        got_runs = results[name]
        b.say(f"  {name:12s} p50 {b.median([b.percentile(r.latencies_ms, 0.5) for r in got_runs]):7.1f} ms  "
              f"p99 {b.median([b.percentile(r.latencies_ms, 0.99) for r in got_runs]):7.1f} ms  "
              f"{b.median([r.cpu_us_per_delivery for r in got_runs]):8.1f} us CPU a delivery  "
              f"exactly once, in order: {'yes' if all(r.exact for r in got_runs) else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", type=variant, action="append", required=True,
                        help="NAME or NAME:VAR=VALUE,...: a platform started with these settings")
    parser.add_argument("--followers", type=int, default=1000)
    parser.add_argument("--points", type=int, default=500)
    parser.add_argument("--rate", type=float, default=50.0, help="points/s")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--no-batch", dest="batch", action="store_false",
                        help="followers ask for one point a message")
    args = parser.parse_args()
    if len({name for name, _ in args.variant}) != len(args.variant):
        parser.error("variant names must differ")
    with tempfile.TemporaryDirectory(prefix="compare-fanout-") as tmp:
        asyncio.run(compare(args, Path(tmp)))


if __name__ == "__main__":
    main()
