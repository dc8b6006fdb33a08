"""A store on object storage vs the same store on local disk: train reading it, precompute writing it.

The S3 side is a real S3-compatible server over HTTP on this machine (moto's server mode, the one the
tests use: tests/s3_server.py, with its IAM signature checks on), so the numbers carry HTTP, request
signing, s3fs and botocore, but not a network's latency or bandwidth: read them as the client's cost
of object storage. The server runs in a process of its own (as a remote one would, it does not hold
the measured process's GIL) but on the same CPUs, so its work (moto's parsing and signature checks)
still competes with the measured run's: a pessimistic floor for a remote bucket.

For each format (zarr, wds), in rounds that alternate the order (local, s3 then s3, local):
- precompute (A: into s3://..., B: into a local directory): the same teacher, data, recipe and
  chunking, views/s of the whole command (teacher forward included, as a user sees it);
- train (A: `--shards s3://...`, B: the local store): the same student, batch, workers and epochs;
  views/s in the steady state (steps after the first --skip) and over the whole epoch;
- replay alone (`kdlib.Replay.from_store`, the same batch and workers, no student): what the store and
  the feed can deliver, i.e. the most train could consume; on a CPU the student is the bottleneck of
  train, so this row is the one where the store's place shows.
Requests and response bytes per view come from the server itself (a WSGI wrapper counts what goes over
the wire), and "chunk reads" counts the commit records the replay fetched after the store was opened
(one per chunk `Store.read_chunk` reads; opening a store also fetches one per stored epoch, its check).

    .venv/bin/python benchmarks/s3_store.py                       # ~5-10 min on 2 loaded CPU cores
    .venv/bin/python benchmarks/s3_store.py --limit 2048 --rounds 1   # a quick look
    .venv/bin/python benchmarks/s3_store.py --chunk-views 1024    # smaller chunks
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import _common as C

sys.path.insert(0, str(C.REPO / "tests"))
from s3_server import S3ServerProcess  # noqa: E402  (the tests' server, in a process of its own)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=8192, help="images of the train split (views per epoch)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip", type=int, default=2, help="first steps of an epoch left out of the steady rate")
    ap.add_argument("--batch-size", type=int, default=128, help="train's global batch (the README's: 128)")
    ap.add_argument("--teacher-batch", type=int, default=256, help="precompute's batch (its default)")
    ap.add_argument("--chunk-views", type=int, default=4096, help="views per chunk (the default: 4096)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (train's default: 2)")
    ap.add_argument("--student", default="resnet8")
    ap.add_argument("--teacher", default="resnet8")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--formats", default="zarr,wds")
    ap.add_argument("--keep", default=None, help="work directory to keep (default: a temp dir, removed)")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/s3_store.json)")
    args = ap.parse_args()

    from kdlib.precompute import PrecomputeConfig, precompute
    from kdlib.store import open_store
    from kdlib.train import TrainConfig, train

    server = S3ServerProcess()
    os.environ.update(server.env())
    os.environ.setdefault("KDLIB_DATA", "/usr/share/datasets/fashion-mnist")
    machine = C.machine_info()
    work = C.tmpdir(args.keep, "s3")
    fs = server.fs()

    def pre(out: str, backend: str) -> PrecomputeConfig:
        return PrecomputeConfig(
            teacher=args.teacher,
            data="fashion-mnist",
            recipe=C.FMNIST_RECIPE,
            out=out,
            k=args.k,
            batch_size=args.teacher_batch,
            workers=args.workers,
            limit=args.limit,
            chunk_views=args.chunk_views,
            backend=backend,
            test=False,
        )

    def trained(shards: str, out: str) -> TrainConfig:
        return TrainConfig(
            out=out,
            shards=shards,
            student=args.student,
            epochs=1,
            batch_size=args.batch_size,
            workers=args.workers,
            eval=False,
            checkpoint_every=0,
        )

    def replay_views(url: str) -> tuple[int, float, int]:
        """Views fed, the seconds of the whole replay (opening the store too), and the chunks read after
        the store was opened (commit records fetched); the counters are asked outside the timed parts."""
        from kdlib import Replay

        t0 = time.perf_counter()
        replay = Replay.from_store(url, batch_size=args.batch_size, epochs=1, workers=args.workers, device="cpu")
        opened = time.perf_counter() - t0
        server.traffic.reset()
        t0 = time.perf_counter()
        fed = sum(int(b.views.shape[0]) for b in replay)
        return fed, opened + time.perf_counter() - t0, sum(server.traffic.commits_read.values())

    runs: dict[str, list[dict]] = {}
    for backend in args.formats.split(","):
        for r in range(args.rounds):
            for where in C.order(r, ["local", "s3"]):
                key = f"{backend}/{where}"
                url = str(work / f"{backend}-{r}") if where == "local" else server.url(f"{backend}-{r}")
                server.traffic.reset()
                with C.quiet():
                    _, seconds = C.timed(lambda: precompute(pre(url, backend)))
                views = open_store(url).meta.views_per_epoch
                reqs, sent = server.traffic.snapshot()
                runs.setdefault(f"precompute {key}", []).append(
                    {
                        "views_per_s": views / seconds,
                        "seconds": seconds,
                        "views": views,
                        "requests": reqs,
                        "bytes_out": sent,
                    }
                )
                out = work / f"run-{backend}-{where}-{r}"
                server.traffic.reset()
                rate = C.timed_train(train, trained(url, str(out)), out, args.batch_size, args.skip)
                reqs, sent = server.traffic.snapshot()
                rate.update(
                    requests=reqs,
                    bytes_out=sent,
                    commit_records_read=sum(server.traffic.commits_read.values()),  # + the open's check
                    chunks=open_store(url).meta.chunks_per_epoch,
                )
                runs.setdefault(f"train {key}", []).append(rate)
                with C.quiet():
                    fed, fed_s, chunk_reads = replay_views(url)
                reqs, sent = server.traffic.snapshot()
                runs.setdefault(f"replay {key}", []).append(
                    {
                        "views_per_s": fed / fed_s,
                        "views": fed,
                        "requests": reqs,
                        "bytes_out": sent,
                        "chunk_reads": chunk_reads,
                        "chunks": rate["chunks"],
                    }
                )
                print(
                    f"round {r} {backend} {where:>5}: precompute {views / seconds:.0f} views/s, train "
                    f"{rate['steady_views_per_s']:.0f} views/s steady ({rate['views_per_s']:.0f} whole epoch), "
                    f"replay alone {fed / fed_s:.0f} views/s, {chunk_reads} chunk reads of {rate['chunks']} chunks",
                    flush=True,
                )
                if where == "local":
                    shutil.rmtree(url, ignore_errors=True)
                else:
                    fs.rm(url, recursive=True)

    rows, summary = [], {}
    for backend in args.formats.split(","):
        for what, metric in (
            ("train, steady", "steady_views_per_s"),
            ("train, whole epoch", "views_per_s"),
            ("replay alone (no student)", "views_per_s"),
            ("precompute", "views_per_s"),
        ):
            stage = what.split(" ")[0].rstrip(",")
            s3 = [x[metric] for x in runs[f"{stage} {backend}/s3"]]
            local = [x[metric] for x in runs[f"{stage} {backend}/local"]]
            paired = [a / b for a, b in zip(s3, local)]
            s3_runs = runs[f"{stage} {backend}/s3"]
            req = C.median([sum(x["requests"].values()) / x["views"] for x in s3_runs])
            got = C.median([sum(x["bytes_out"].values()) / x["views"] for x in s3_runs])
            reads = (
                f"{C.median([x['chunk_reads'] for x in s3_runs]):.0f} / {s3_runs[0]['chunks']}"
                if stage == "replay"
                else "-"
            )
            summary[f"{backend} {what}"] = {"s3": s3, "local": local, "paired": paired, "requests_per_view": req}
            rows.append(
                [backend, what, C.median(s3), C.median(local), C.median(paired), C.spread(paired), req, got, reads]
            )
    table = C.md_table(
        [
            "format",
            "stage",
            "S3 views/s",
            "local views/s",
            "S3/local (median of rounds)",
            f"range, {args.rounds} rounds",
            "requests per view (S3)",
            "bytes served per view (S3)",
            "chunk reads / chunks per epoch",
        ],
        rows,
    )
    target = 0.9
    worst = min(v["paired"] and C.median(v["paired"]) for k, v in summary.items() if "train, steady" in k)
    table += (
        f"\n\ntarget S3/local >= {target} for train at batch {args.batch_size}, chunks of {args.chunk_views} views: "
        f"worst format {worst:.3f}, {'met' if worst >= target else 'MISSED'}"
    )
    print()
    print(
        f"S3 vs local store: {args.student} student, {args.teacher} teacher, batch {args.batch_size}, "
        f"{args.workers} workers, {args.limit} views per epoch, chunks of {args.chunk_views}, on {C.device_label(machine)}\n"
    )
    print(table)
    path = C.write_result("s3_store", machine, vars(args), {"runs": runs, "summary": summary}, table, args.out)
    print(f"\nwrote {path}")
    server.stop()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
