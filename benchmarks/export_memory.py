"""Does exporting judgments stream with flat memory? 10k, 100k and 1M judgments.

The parent process seeds one campaign per size (overlap 1, every slot judged, bulk loads)
and then, for each size and format, starts a fresh child process that exports the whole
campaign and throws the bytes away while a thread samples its resident set size every 10 ms.
A fresh process per run keeps ``ru_maxrss`` honest (it is a high-water mark).

``--via view`` (default) streams through the real API view,
GET /api/campaigns/<slug>/export/?format=..., with Django's test client logged in as the
campaign admin (no socket: it measures the server side only). ``--via generator`` calls
``selectors.judgments_for_export`` and ``annotation.formats`` directly.

    .venv/bin/python benchmarks/export_memory.py                       # PostgreSQL
    .venv/bin/python benchmarks/export_memory.py --sizes 10000,100000 --formats full

Reported: lines/s, MB/s, peak RSS and its growth over the RSS before the export started,
``ru_maxrss``, SQL queries per 1,000 lines (N+1 detector), optionally the tracemalloc peak
(``--tracemalloc``; it slows Python down, so lines/s is not comparable in that mode).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from typing import Any

import _common as c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--sizes", default="10000,100000,1000000", help="judgments per campaign")
    parser.add_argument("--formats", default="trl,full")
    parser.add_argument("--via", choices=["view", "generator"], default="view")
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the seeded campaigns")
    parser.add_argument("--reuse", action="store_true", help="reuse campaigns seeded by --keep")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    url = c.database_url(args.db)
    c.setup_django(url)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    formats = [f for f in args.formats.split(",") if f]
    header = [
        f"# export_memory on {c.database_version()}, via {args.via}",
        f"# machine: {c.machine()}",
        f"# command: {c.command_line()}",
    ]
    print("\n".join(header), flush=True)

    from annotation.models import Campaign

    seed_s: dict[int, float] = {}
    if not args.reuse:
        c.reset_data()
        raters = c.make_users("rater", 8)
        for size in sizes:
            t = time.perf_counter()
            c.seed_campaign(
                slug=f"export-{size}",
                comparisons=size,
                overlap=1,
                raters=raters,
                fill=lambda i, j, ids=tuple(r.pk for r in raters): ids[i % len(ids)],
            )
            seed_s[size] = time.perf_counter() - t
        c.vacuum_analyze()
    for size in sizes:
        if not Campaign.objects.filter(slug=f"export-{size}").exists():
            raise SystemExit(f"no campaign export-{size}; run without --reuse first")

    rows = []
    for size in sizes:
        for fmt in formats:
            c.log(f"exporting {size:,} judgments as {fmt} via {args.via}")
            result = run_child(url, slug=f"export-{size}", fmt=fmt, args=args)
            result.update(size=size, fmt=fmt, seed_s=seed_s.get(size, float("nan")))
            rows.append(result)
    if not args.keep:
        c.reset_data()

    print()
    print(
        c.table(
            [
                "judgments",
                "format",
                "lines",
                "MB",
                "seconds",
                "lines/s",
                "RSS before MB",
                "RSS peak MB",
                "growth MB",
                "ru_maxrss MB",
                "queries / 1k lines",
                "machine busy",
                *(["tracemalloc peak MB"] if args.tracemalloc else []),
            ],
            [
                (
                    r["size"],
                    r["fmt"],
                    r["lines"],
                    r["bytes"] / 1e6,
                    r["seconds"],
                    r["lines"] / r["seconds"] if r["seconds"] else float("nan"),
                    r["rss_before"] / 1e6,
                    r["rss_peak"] / 1e6,
                    (r["rss_peak"] - r["rss_before"]) / 1e6,
                    r["maxrss"] / 1e6,
                    1000 * r["queries"] / max(r["lines"], 1),
                    f"{100 * r['busy']:.0f}%",
                    *([r["tracemalloc_peak"] / 1e6] if args.tracemalloc else []),
                )
                for r in rows
            ],
        )
    )
    by_fmt: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_fmt.setdefault(r["fmt"], []).append(r)
    for fmt, runs in by_fmt.items():
        if len(runs) > 1:
            small, big = runs[0], runs[-1]
            print(
                f"\n{fmt}: {big['size'] // small['size']}x the judgments, RSS growth "
                f"{(small['rss_peak'] - small['rss_before']) / 1e6:.1f} MB -> "
                f"{(big['rss_peak'] - big['rss_before']) / 1e6:.1f} MB"
            )
    if seed_s:
        print(
            "\nseeding: "
            + ", ".join(f"{size:,} judgments in {s:.0f} s" for size, s in seed_s.items())
        )
    path = c.save_results(f"export_memory-{args.db}", {"header": header, "results": rows})
    print(f"\n# raw results: {path.relative_to(c.ROOT)}")


def run_child(url: str, *, slug: str, fmt: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", slug, "--formats", fmt, "--via", args.via]
    if args.tracemalloc:
        cmd.append("--tracemalloc")
    env = {**os.environ, **c.bench_env(url)}
    env["SECRET_KEY"] = os.environ.get("SECRET_KEY") or env["SECRET_KEY"]
    busy = c.BusyMeter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"export child failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["busy"] = busy.share()
    return result


def child(args: argparse.Namespace) -> None:
    """Export one campaign and print one JSON line with the measurements."""
    c.setup_django(os.environ["DATABASE_URL"], migrate=False)
    from django.db import connection

    from annotation.models import Campaign, Membership, Role

    slug, fmt = args.child, args.formats
    campaign = Campaign.objects.get(slug=slug)
    admin = Membership.objects.filter(campaign=campaign, role=Role.ADMIN).first().user
    connection.ensure_connection()

    if args.via == "view":
        from django.test import Client

        client = Client(HTTP_HOST="127.0.0.1")
        client.force_login(admin)

        def stream() -> Any:
            response = client.get(f"/api/campaigns/{slug}/export/", {"format": fmt})
            if response.status_code != 200:
                raise SystemExit(f"export view answered {response.status_code}")
            return response.streaming_content

    else:
        from annotation import formats, selectors

        def stream() -> Any:
            judgments = selectors.judgments_for_export(campaign=campaign)
            return formats.export_chunks(judgments, fmt=fmt)

    queries = 0

    def count(execute, sql, params, many, context):  # type: ignore[no-untyped-def]
        nonlocal queries
        queries += 1
        return execute(sql, params, many, context)

    import gc

    gc.collect()
    rss_before = c.rss_bytes()
    peak = rss_before
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.01):
            peak = max(peak, c.rss_bytes())

    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = size = 0
    start = time.perf_counter()
    with connection.execute_wrapper(count):
        for chunk in stream():
            lines += chunk.count(b"\n")
            size += len(chunk)
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    peak = max(peak, c.rss_bytes())
    result = {
        "lines": lines,
        "bytes": size,
        "seconds": seconds,
        "rss_before": rss_before,
        "rss_peak": peak,
        "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "queries": queries,
    }
    if args.tracemalloc:
        import tracemalloc

        result["tracemalloc_peak"] = tracemalloc.get_traced_memory()[1]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
