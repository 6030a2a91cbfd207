"""Does leasing the next comparison stay flat as a campaign grows from 10k to 1M comparisons?

The script empties the dedicated benchmark database and seeds one campaign per size side by
side (overlap 2, 16 completions per prompt and all their pairs) with bulk loads. In each, the
measured rater has a history: the first ``--prior`` comparisons are already judged by them
and a partner rater. It then times the real services, in process, in rounds that alternate
between the sizes (so a busy neighbour on a shared machine slows every size alike):

    slot_lease_next(rater)  ->  judgment_submit(rater)      (timed: "lease", "submit")
    slot_lease_next(partner) -> judgment_submit(partner)    (untimed: fills the other slot,
                                                             as a second rater would)

and prints EXPLAIN (ANALYZE, BUFFERS) of the queue queries one lease runs. A last probe
times a rater whose own judged comparisons still have open slots ahead of everything else in
the queue ("backlog"): each of those is skipped by the lease query, so that cost grows with
the backlog, not with the campaign.

    .venv/bin/python benchmarks/lease_scaling.py                      # PostgreSQL, 10k/100k/1M
    .venv/bin/python benchmarks/lease_scaling.py --db sqlite --sizes 10000

PostgreSQL: postgres://postgres@127.0.0.1:5432/bench_rlhf (created and migrated if missing,
emptied before and after; override with BENCH_DATABASE_URL). ``--keep`` keeps the seeded
campaigns and ``--reuse`` measures them again without seeding.
"""

from __future__ import annotations

import argparse
import random
import time
import uuid
from typing import Any

import _common as c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comparisons per run")
    parser.add_argument("--calls", type=int, default=300, help="timed lease+submit rounds")
    parser.add_argument("--prior", type=int, default=2000, help="comparisons already judged")
    parser.add_argument("--overlap", type=int, default=2)
    parser.add_argument(
        "--backlog", default="0,100,1000,5000", help="backlog sizes probed at the last size"
    )
    parser.add_argument("--backlog-calls", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=6, help="alternations between sizes")
    parser.add_argument(
        "--no-stale-probe",
        dest="stale_probe",
        action="store_false",
        help="skip timing leases right after each import, before ANALYZE",
    )
    parser.add_argument("--keep", action="store_true", help="keep the seeded campaigns")
    parser.add_argument("--reuse", action="store_true", help="measure campaigns kept by --keep")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    backlogs = [int(s) for s in args.backlog.split(",") if s]

    c.setup_django(c.database_url(args.db))
    header = [
        f"# lease_scaling on {c.database_version()}",
        f"# machine: {c.machine()}",
        f"# command: {c.command_line()}",
    ]
    print("\n".join(header), flush=True)

    from annotation.models import Campaign

    rater, partner = c.make_users("rater", 2)
    campaigns: dict[int, Any] = {}
    seed_s: dict[int, float] = {}
    stale: dict[int, dict[str, Any]] = {}
    if args.reuse:
        for size in sizes:
            campaigns[size] = Campaign.objects.get(slug=f"lease-{size}")
    else:
        c.reset_data()
        rater, partner = c.make_users("rater", 2)
        for size in sizes:
            # Statistics as a live database has them before an import: current, then stale.
            c.vacuum_analyze()
            t = time.perf_counter()
            seeded = c.seed_campaign(
                slug=f"lease-{size}",
                comparisons=size,
                overlap=args.overlap,
                raters=[rater, partner],
                fill=_history(prior=min(args.prior, size // 2), rater_ids=(rater.pk, partner.pk)),
            )
            seed_s[size] = time.perf_counter() - t
            campaigns[size] = seeded.campaign
            c.log(f"size {size}: seeded in {seed_s[size]:.1f}s")
            if args.stale_probe:
                stale[size] = probe_stale(seeded.campaign, rater, calls=3)
                c.log(f"size {size}: lease before ANALYZE {stale[size]['lease']['median']:.0f} ms")
    vacuum_s = c.vacuum_analyze()
    c.log(f"vacuum/analyze {vacuum_s:.1f}s")

    samples: dict[int, dict[str, list[float]]] = {
        size: {"lease": [], "submit": [], "cycle": []} for size in sizes
    }
    for size in sizes:  # warm-up, not recorded
        measure(campaigns[size], rater, partner, calls=20)
    busy = c.BusyMeter()
    per_round = -(-args.calls // args.rounds)
    for n in range(args.rounds):
        order = sizes if n % 2 == 0 else sizes[::-1]
        for size in order:
            got = measure(campaigns[size], rater, partner, calls=per_round)
            for key, values in got.items():
                samples[size][key] += values
    busy_share = busy.share()
    results: list[dict[str, Any]] = []
    explains: dict[int, list[tuple[str, str]]] = {}
    for size in sizes:
        row: dict[str, Any] = {k: c.summary_ms(v) for k, v in samples[size].items()}
        row.update(size=size, seed_s=seed_s.get(size, float("nan")))
        explains[size] = explain_lease(campaigns[size], rater)
        row["explain_ms"] = _execution_ms(explains[size])
        results.append(row)
        c.log(
            f"size {size}: lease median {row['lease']['median']:.2f} ms, "
            f"submit median {row['submit']['median']:.2f} ms"
        )
    backlog_rows = [
        probe_backlog(campaigns[sizes[-1]], rater, backlog, calls=args.backlog_calls)
        for backlog in backlogs
    ]
    if not args.keep:
        c.reset_data()

    print()
    print(
        c.table(
            [
                "comparisons",
                "slots",
                "seed s",
                "lease p50 ms",
                "lease p95 ms",
                "submit p50 ms",
                "submit p95 ms",
                "lease+submit p99 ms",
                "candidate query ms (EXPLAIN ANALYZE)",
                "lease p50 ms right after import, before ANALYZE",
            ],
            [
                (
                    r["size"],
                    r["size"] * args.overlap,
                    r["seed_s"],
                    r["lease"]["median"],
                    r["lease"]["p95"],
                    r["submit"]["median"],
                    r["submit"]["p95"],
                    r["cycle"]["p99"],
                    r["explain_ms"],
                    stale[r["size"]]["lease"]["median"] if r["size"] in stale else float("nan"),
                )
                for r in results
            ],
        )
    )
    if len(results) > 1:
        first, last = results[0], results[-1]
        print(
            f"\nlease median, {last['size']:,} vs {first['size']:,} comparisons: "
            f"{last['lease']['median'] / first['lease']['median']:.2f}x; "
            f"submit: {last['submit']['median'] / first['submit']['median']:.2f}x "
            f"({per_round * args.rounds} timed lease+submit per size in {args.rounds} "
            f"alternating rounds; the rater had {args.prior:,} earlier judgments)"
        )
    print(
        f"machine busy during the timed rounds: {100 * busy_share:.0f}% of all cores "
        "(this script uses about one core; more means other processes were running)"
    )
    if backlog_rows:
        print(
            f"\nBacklog probe at {sizes[-1]:,} comparisons: the rater's own judged comparisons "
            "whose other slot is still open sit at the head of the queue."
        )
        print(
            c.table(
                ["backlog", "lease p50 ms", "lease p95 ms", "candidate query ms"],
                [
                    (b["backlog"], b["lease"]["median"], b["lease"]["p95"], b["explain_ms"])
                    for b in backlog_rows
                ],
            )
        )
    for size, probe in stale.items():
        print(
            f"\n## Right after importing {size:,} comparisons, before ANALYZE (stale "
            "statistics): the candidate query"
        )
        print(probe["plan"])
    for size, plans in explains.items():
        print(f"\n## EXPLAIN of the lease queries at {size:,} comparisons")
        for label, plan in plans:
            print(f"\n-- {label}\n{plan}")
    path = c.save_results(
        f"lease_scaling-{args.db}",
        {
            "header": header,
            "results": results,
            "backlog": backlog_rows,
            "busy": busy_share,
            "stale": stale,
        },
    )
    print(f"\n# raw results: {path.relative_to(c.ROOT)}")


def _history(*, prior: int, rater_ids: tuple[int, ...]) -> c.FillFn:
    """The first ``prior`` comparisons were judged: slot j by rater_ids[j]."""

    def fill(i: int, j: int) -> int | None:
        return rater_ids[j] if i < prior and j < len(rater_ids) else None

    return fill


def measure(campaign: Any, rater: Any, partner: Any, *, calls: int) -> dict[str, list[float]]:
    """``calls`` timed lease+submit rounds of ``rater``, each followed by an untimed one of
    ``partner`` (who takes the comparison's other slot). Seconds per call."""
    from annotation.services.judgments import judgment_submit, slot_lease_next

    rng = random.Random(7)
    lease_s: list[float] = []
    submit_s: list[float] = []
    cycle_s: list[float] = []
    for _ in range(calls):
        t0 = time.perf_counter()
        slot = slot_lease_next(rater=rater, campaign=campaign)
        t1 = time.perf_counter()
        assert slot is not None, "campaign ran out of work"
        judgment_submit(
            rater=rater,
            campaign=campaign,
            slot_id=slot.pk,
            choice=rng.choice(["a", "b"]),
            strength=2,
            decision_ms=rng.randint(1000, 20_000),
            idempotency_key=uuid.uuid4().hex,
        )
        t2 = time.perf_counter()
        lease_s.append(t1 - t0)
        submit_s.append(t2 - t1)
        cycle_s.append(t2 - t0)
        other = slot_lease_next(rater=partner, campaign=campaign)
        if other is not None:
            judgment_submit(rater=partner, campaign=campaign, slot_id=other.pk, choice="tie")
    return {"lease": lease_s, "submit": submit_s, "cycle": cycle_s}


def explain_lease(campaign: Any, rater: Any, *, release: bool = False) -> list[tuple[str, str]]:
    """Run one real lease and capture its SELECTs that lock rows; submit (or release) it, so
    the state is as before; then EXPLAIN those SELECTs inside a transaction that is rolled
    back (EXPLAIN ANALYZE really takes the row locks)."""
    from django.db import connection, transaction

    from annotation.services.judgments import judgment_submit, slot_lease_next, slot_release

    captured: list[tuple[str, Any]] = []

    def capture(execute, sql, params, many, context):  # type: ignore[no-untyped-def]
        # The queue queries: SELECTs on the slot table with an ORDER BY (they also say FOR
        # UPDATE SKIP LOCKED on PostgreSQL; SQLite drops that clause).
        if (
            sql.lstrip().startswith("SELECT")
            and 'FROM "annotation_slot"' in sql
            and ("ORDER BY" in sql)
        ):
            captured.append((sql, params))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(capture):
        slot = slot_lease_next(rater=rater, campaign=campaign)
    assert slot is not None
    if release:
        slot_release(rater=rater, campaign=campaign, slot_id=slot.pk)
    else:
        judgment_submit(rater=rater, campaign=campaign, slot_id=slot.pk, choice="a")
    explain = "EXPLAIN (ANALYZE, BUFFERS) "
    if connection.vendor != "postgresql":
        explain = "EXPLAIN QUERY PLAN "
    plans = []
    for n, (sql, params) in enumerate(captured):
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(explain + sql, params)
            lines = [str(r[-1]) for r in cursor.fetchall()]  # PostgreSQL: one column
            plans.append((_label(sql, n), "\n".join(lines)))
            transaction.set_rollback(True)
    return plans


def _label(sql: str, n: int) -> str:
    text = sql.replace('"', "")
    if "priority DESC" in text:
        return f"query {n + 1}: open slots (the candidate query)"
    if "lease_expires_at <" in text:
        return f"query {n + 1}: expired leases of other raters"
    return f"query {n + 1}: the rater's own live lease"


def _execution_ms(plans: list[tuple[str, str]]) -> float:
    """Execution time of the candidate (open-slot) query from its EXPLAIN ANALYZE."""
    for label, plan in plans:
        if "candidate" in label:
            for line in plan.splitlines():
                if line.startswith("Execution Time:"):
                    return float(line.split(":")[1].split()[0])
    return float("nan")


def probe_stale(campaign: Any, rater: Any, *, calls: int) -> dict[str, Any]:
    """Time leases (each released again) on a campaign just bulk-loaded, before ANALYZE: the
    planner still believes the campaign is (nearly) empty, as it does in production between a
    large import and autovacuum's next ANALYZE of the slot table."""
    from annotation.services.judgments import slot_lease_next, slot_release

    lease_s = []
    for _ in range(calls):
        t0 = time.perf_counter()
        slot = slot_lease_next(rater=rater, campaign=campaign)
        lease_s.append(time.perf_counter() - t0)
        assert slot is not None
        slot_release(rater=rater, campaign=campaign, slot_id=slot.pk)
    plans = explain_lease(campaign, rater, release=True)
    plan = next((p for label, p in plans if "candidate" in label), "")
    return {"lease": c.summary_ms(lease_s), "plan": plan}


def probe_backlog(campaign: Any, rater: Any, backlog: int, *, calls: int) -> dict[str, Any]:
    """Give ``rater`` ``backlog`` judged comparisons whose other slot is still open, at the head
    of the queue, then time leases (each released again so the state does not move)."""
    from django.db import transaction
    from django.utils import timezone

    from annotation.models import Slot, SlotStatus
    from annotation.services.judgments import slot_lease_next, slot_release

    head: list[int] = []
    if backlog:
        # The first `backlog` comparisons that still have every slot open, in queue order.
        ids = list(
            Slot.objects.filter(campaign=campaign, status=SlotStatus.OPEN, index=0)
            .order_by("-priority", "id")
            .values_list("id", flat=True)[:backlog]
        )
        with transaction.atomic():
            # Slots only, no judgment rows: the lease query reads slots alone, and the rows
            # are put back below.
            Slot.objects.filter(id__in=ids).update(
                status=SlotStatus.FILLED, rater=rater, filled_at=timezone.now()
            )
        head = ids
    lease_s = []
    try:
        for i in range(calls + 5):
            t0 = time.perf_counter()
            slot = slot_lease_next(rater=rater, campaign=campaign)
            t1 = time.perf_counter()
            assert slot is not None
            slot_release(rater=rater, campaign=campaign, slot_id=slot.pk)
            if i >= 5:
                lease_s.append(t1 - t0)
        plans = explain_lease(campaign, rater, release=True)
    finally:
        if head:
            Slot.objects.filter(id__in=head).update(
                status=SlotStatus.OPEN, rater=None, filled_at=None
            )
    return {
        "backlog": backlog,
        "lease": c.summary_ms(lease_s),
        "explain_ms": _execution_ms(plans),
    }


if __name__ == "__main__":
    main()
