"""Shared pieces of the benchmark scripts: Django set-up on a dedicated database, fast bulk
seeding, percentiles and Markdown tables.

Benchmarks write straight to the database (COPY on PostgreSQL, executemany on SQLite) to seed
millions of rows in minutes; everything they then *measure* goes through the real services,
selectors, views or HTTP API. They refuse to touch a database whose name does not contain
"bench", because they truncate it.
"""

from __future__ import annotations

import json
import os
import platform
import random
import secrets
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PG_URL = "postgres://postgres@127.0.0.1:5432/bench_rlhf"
SQLITE_URL = f"sqlite:///{ROOT / 'var' / 'bench.sqlite3'}"
RESULTS_DIR = ROOT / "benchmarks" / "results"

# A deterministic pool of text: prompts of ~40 words and answers of ~150 words, like the
# Label Studio measurement in the peer benchmark. Rows share texts; ids make them distinct.
_WORDS = str.split(
    "the model answer explains why a careful reader should check each claim before trusting "
    "it because sources differ and evidence matters when you compare two responses side by "
    "side for accuracy clarity safety tone and usefulness in a real conversation about code "
    "history science cooking travel health money law music sport weather language maths "
    "first second finally however therefore example step result error test data value"
)


def _paragraphs(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(words)).capitalize() + "." for _ in range(n)]


PROMPT_TEXTS = _paragraphs(64, 40, seed=1)
ANSWER_TEXTS = _paragraphs(128, 150, seed=2)


# -- set-up -------------------------------------------------------------------------------------


def bench_env(database_url: str) -> dict[str, str]:
    """The production-shaped environment the benchmarks run Django (and gunicorn) in."""
    return {
        "DATABASE_URL": database_url,
        "DEBUG": "0",
        "SECRET_KEY": os.environ.get("SECRET_KEY") or secrets.token_urlsafe(64),
        "SECURE_TRANSPORT": "0",
        "STATIC_MANIFEST": "0",
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "LOG_LEVEL": "WARNING",
        "OMP_NUM_THREADS": "1",
    }


def setup_django(database_url: str, *, migrate: bool = True) -> None:
    """Configure the real settings module against ``database_url`` and migrate it."""
    _require_bench_name(database_url)
    for key, value in bench_env(database_url).items():
        os.environ.setdefault(key, value)
    os.environ["DATABASE_URL"] = database_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "rlhf_site.settings")
    if migrate and database_url.startswith("postgres"):
        _create_pg_database(database_url)
    import django

    django.setup()
    if migrate:
        from django.core.management import call_command
        from django.db import DatabaseError, connection

        try:
            call_command("migrate", verbosity=0, interactive=False)
        except DatabaseError:
            if connection.vendor != "postgresql":
                raise
            # The migrations changed under an old benchmark schema (a migration renamed or
            # rewritten): the database is the benchmarks' own, so start it afresh.
            log(f"migrating {database_url} failed; recreating it")
            connection.close()
            _create_pg_database(database_url, drop=True)
            call_command("migrate", verbosity=0, interactive=False)


def _require_bench_name(database_url: str) -> None:
    name = database_url.rsplit("/", 1)[-1]
    if "bench" not in name:
        raise SystemExit(
            f"refusing to use {database_url!r}: the database name must contain 'bench'"
        )


def _create_pg_database(database_url: str, *, drop: bool = False) -> None:
    import psycopg

    _require_bench_name(database_url)
    base, name = database_url.rsplit("/", 1)
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        if drop:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')


def database_url(db: str) -> str:
    """``BENCH_DATABASE_URL`` if set, else the default URL for ``db`` (postgres or sqlite)."""
    return os.environ.get("BENCH_DATABASE_URL") or (PG_URL if db == "postgres" else SQLITE_URL)


def is_postgres() -> bool:
    from django.db import connection

    return connection.vendor == "postgresql"


def reset_data() -> None:
    """Empty every table the benchmarks write to (campaign data, bench users, tokens)."""
    from django.contrib.auth import get_user_model
    from django.db import connection, transaction

    from annotation import models as m

    tables = [
        model._meta.db_table
        for model in (
            m.Judgment,
            m.Slot,
            m.Comparison,
            m.Critique,
            m.Completion,
            m.Prompt,
            m.Membership,
            m.Campaign,
            m.Source,
        )
    ]
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(f"TRUNCATE {', '.join(tables)} CASCADE")
        else:
            with connection.cursor() as cursor:
                for table in tables:
                    cursor.execute(f"DELETE FROM {table}")
        get_user_model().objects.filter(username__startswith="bench-").delete()
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("VACUUM")


def vacuum_analyze() -> float:
    """What autovacuum would have done by the time a real campaign of this size is live:
    fresh planner statistics and a visibility map. Returns the seconds it took."""
    from django.db import connection

    from annotation import models as m

    start = time.perf_counter()
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            for model in (m.Prompt, m.Completion, m.Comparison, m.Slot, m.Judgment):
                cursor.execute(f"VACUUM (ANALYZE) {model._meta.db_table}")
        else:
            cursor.execute("ANALYZE")
    return time.perf_counter() - start


# -- bulk seeding -------------------------------------------------------------------------------


class BulkLoader:
    """Write rows straight into a model's table: COPY on PostgreSQL, executemany on SQLite.

    ``fields`` are the attnames the caller supplies per row (explicit ids included); every other
    concrete field gets its model default once, so a field another change adds with a default
    does not break the seeding. A NOT NULL field without a default does, loudly.
    """

    def __init__(self, model: type, fields: Sequence[str]) -> None:
        from django.db import connection
        from django.db.models import JSONField

        self.model = model
        self.table = model._meta.db_table
        given = set(fields)
        now = _db_now()
        tail_fields, tail_values = [], []
        for f in model._meta.concrete_fields:
            if f.attname in given:
                continue
            if getattr(f, "auto_now", False) or getattr(f, "auto_now_add", False):
                value: Any = now
            elif f.has_default():
                value = f.get_default()
                if isinstance(f, JSONField):
                    value = json.dumps(value)
                elif connection.vendor == "sqlite" and isinstance(value, datetime):
                    value = connection.ops.adapt_datetimefield_value(value)
            elif f.null:
                value = None
            elif f.blank:
                value = ""
            else:
                raise RuntimeError(f"BulkLoader: {model.__name__}.{f.name} needs a value")
            tail_fields.append(f.column)
            tail_values.append(value)
        columns = [model._meta.get_field(name).column for name in _fields_by_attname(model, fields)]
        self.columns = columns + tail_fields
        self.tail = tuple(tail_values)

    def load(self, rows: Iterable[tuple[Any, ...]]) -> int:
        from django.db import connection

        count = 0
        tail = self.tail
        cols = ", ".join(f'"{c}"' for c in self.columns)
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                with cursor.cursor.copy(f'COPY "{self.table}" ({cols}) FROM STDIN') as copy:
                    for row in rows:
                        copy.write_row(row + tail)
                        count += 1
            else:
                marks = ", ".join("?" for _ in self.columns)
                sql = f'INSERT INTO "{self.table}" ({cols}) VALUES ({marks})'
                raw = cursor.cursor
                batch: list[tuple[Any, ...]] = []
                for row in rows:
                    batch.append(row + tail)
                    if len(batch) >= 20_000:
                        raw.executemany(sql, batch)
                        count += len(batch)
                        batch = []
                raw.executemany(sql, batch)
                count += len(batch)
        return count


def _fields_by_attname(model: type, attnames: Sequence[str]) -> list[str]:
    by_attname = {f.attname: f.name for f in model._meta.concrete_fields}
    return [by_attname[a] for a in attnames]


def _db_now() -> Any:
    from django.db import connection
    from django.utils import timezone

    now = timezone.now()
    if connection.vendor == "sqlite":
        return connection.ops.adapt_datetimefield_value(now)
    return now


def next_id(model: type) -> int:
    """First free primary key; the caller writes explicit ids from here and then calls
    :func:`sync_sequence` (the benchmark database has no other writer while seeding)."""
    from django.db.models import Max

    return (model.objects.aggregate(m=Max("pk"))["m"] or 0) + 1


def sync_sequence(model: type) -> None:
    from django.db import connection

    if connection.vendor != "postgresql":
        return  # SQLite's AUTOINCREMENT follows the largest explicit id by itself.
    table = model._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT setval(pg_get_serial_sequence('\"{table}\"', 'id'), "
            f'COALESCE((SELECT MAX(id) FROM "{table}"), 1))'
        )


# Fill callback: (comparison index, slot index) -> rater id that already judged it, or None.
FillFn = Callable[[int, int], "int | None"]


@dataclass
class Seeded:
    campaign: Any
    comparisons: int
    slots: int
    judgments: int
    first_comparison_id: int
    first_slot_id: int
    seconds: dict[str, float] = field(default_factory=dict)

    def comparison_id(self, i: int) -> int:
        return self.first_comparison_id + i

    def slot_id(self, i: int, j: int) -> int:
        return self.first_slot_id + i * self.campaign.overlap + j


def make_users(prefix: str, n: int) -> list[Any]:
    """``n`` users named ``bench-<prefix>-<i>`` with unusable passwords, in bulk (reused when
    they exist)."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password

    user_model = get_user_model()
    names = [f"bench-{prefix}-{i}" for i in range(n)]
    existing = set(user_model.objects.filter(username__in=names).values_list("username", flat=True))
    user_model.objects.bulk_create(
        [user_model(username=u, password=make_password(None)) for u in names if u not in existing]
    )
    by_name = {u.username: u for u in user_model.objects.filter(username__in=names)}
    return [by_name[u] for u in names]


def seed_campaign(
    *,
    slug: str,
    comparisons: int,
    overlap: int,
    raters: Sequence[Any] = (),
    fill: FillFn | None = None,
    per_prompt: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> Seeded:
    """An active campaign with ``comparisons`` distinct pairs and ``overlap`` slots each.

    Each prompt gets ``per_prompt`` completions and contributes all of their unordered pairs
    (120 pairs for 16), so a million comparisons need ~8.3k prompts and ~133k completions
    rather than two million completions. ``fill`` marks slots as already judged: the slot is
    written filled and its judgment row is written too, consistent with what
    ``judgment_submit`` stores. ``raters`` become members with the rater role.
    """
    from django.db import connection, transaction
    from django.utils import timezone

    from annotation import models as m
    from annotation.services.campaigns import campaign_create

    rng = random.Random(seed)
    timings: dict[str, float] = {}
    pairs_per_prompt = per_prompt * (per_prompt - 1) // 2
    n_prompts = -(-comparisons // pairs_per_prompt)
    owner = make_users("owner", 1)[0]
    sources = [
        m.Source.objects.get_or_create(name=f"bench-model-{k}")[0] for k in range(per_prompt)
    ]
    campaign = campaign_create(
        creator=owner,
        name=f"Benchmark {slug}",
        slug=slug,
        overlap=overlap,
        aspects=["helpfulness", "harmlessness"],
        reason_tags=["more accurate", "clearer", "safer"],
    )
    m.Campaign.objects.filter(pk=campaign.pk).update(status=m.CampaignStatus.ACTIVE)
    campaign.refresh_from_db()
    m.Membership.objects.bulk_create(
        [m.Membership(campaign=campaign, user=r, role=m.Role.RATER) for r in raters],
        ignore_conflicts=True,
    )

    now = timezone.now()
    db_now = _db_now()
    pg = connection.vendor == "postgresql"
    with transaction.atomic():
        if pg:
            # Foreign keys are checked by deferred per-row triggers; millions of them dominate
            # the load time. The rows are consistent by construction (checked below).
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL session_replication_role = replica")
        p0, c0 = next_id(m.Prompt), next_id(m.Completion)
        q0, s0, j0 = next_id(m.Comparison), next_id(m.Slot), next_id(m.Judgment)

        t = time.perf_counter()
        BulkLoader(m.Prompt, ["id", "campaign_id", "external_id", "messages"]).load(
            (
                p0 + p,
                campaign.pk,
                f"bench-{p}",
                json.dumps([{"role": "user", "content": f"{PROMPT_TEXTS[p % 64]} ({p})"}]),
            )
            for p in range(n_prompts)
        )
        BulkLoader(m.Completion, ["id", "prompt_id", "source_id", "text"]).load(
            (
                c0 + p * per_prompt + k,
                p0 + p,
                sources[k].pk,
                ANSWER_TEXTS[(p * 7 + k) % len(ANSWER_TEXTS)],
            )
            for p in range(n_prompts)
            for k in range(per_prompt)
        )
        timings["prompts+completions"] = time.perf_counter() - t

        pair_index = [
            (x, y) for x in range(per_prompt) for y in range(x + 1, per_prompt)
        ]  # canonical: x < y, and completion ids grow with k

        def comparison_rows() -> Iterator[tuple[Any, ...]]:
            for i in range(comparisons):
                p, (x, y) = divmod(i, pairs_per_prompt)[0], pair_index[i % pairs_per_prompt]
                base = c0 + p * per_prompt
                yield (q0 + i, campaign.pk, p0 + p, base + x, base + y, overlap)

        t = time.perf_counter()
        BulkLoader(
            m.Comparison,
            [
                "id",
                "campaign_id",
                "prompt_id",
                "completion_a_id",
                "completion_b_id",
                "judgments_wanted",
            ],
        ).load(comparison_rows())
        timings["comparisons"] = time.perf_counter() - t

        def slot_rows() -> Iterator[tuple[Any, ...]]:
            for i in range(comparisons):
                for j in range(overlap):
                    rater_id = fill(i, j) if fill else None
                    state = (
                        ("open", None, None, None)
                        if rater_id is None
                        else ("filled", rater_id, db_now, db_now)
                    )
                    yield (s0 + i * overlap + j, campaign.pk, q0 + i, j, *state)

        t = time.perf_counter()
        BulkLoader(
            m.Slot,
            [
                "id",
                "campaign_id",
                "comparison_id",
                "index",
                "status",
                "rater_id",
                "leased_at",
                "filled_at",
            ],
        ).load(slot_rows())
        timings["slots"] = time.perf_counter() - t

        choices = ["a", "b", "tie", "both_bad"]

        def filled() -> Iterator[tuple[int, int, int]]:
            # A second pass over ``fill`` (it must be deterministic) instead of a list of a
            # million tuples.
            if fill is None:
                return
            for i in range(comparisons):
                for j in range(overlap):
                    rater_id = fill(i, j)
                    if rater_id is not None:
                        yield i, j, rater_id

        def judgment_rows() -> Iterator[tuple[Any, ...]]:
            for n, (i, j, rater_id) in enumerate(filled()):
                choice = choices[rng.choices(range(4), weights=(45, 40, 10, 5))[0]]
                left_was_a = rng.random() < 0.5
                yield (
                    j0 + n,
                    campaign.pk,
                    q0 + i,
                    s0 + i * overlap + j,
                    rater_id,
                    choice,
                    rng.randint(1, 3) if choice in ("a", "b") else None,
                    json.dumps({"helpfulness": rng.choice("ab")}),
                    json.dumps(["clearer"] if n % 3 == 0 else []),
                    "The chosen answer is more accurate." if n % 5 == 0 else "",
                    left_was_a,
                    rng.randint(800, 30_000),
                    campaign.guidelines_version,
                )

        t = time.perf_counter()
        n_judgments = BulkLoader(
            m.Judgment,
            [
                "id",
                "campaign_id",
                "comparison_id",
                "slot_id",
                "rater_id",
                "choice",
                "strength",
                "aspects",
                "reason_tags",
                "rationale",
                "left_was_a",
                "decision_ms",
                "guidelines_version",
            ],
        ).load(judgment_rows())
        timings["judgments"] = time.perf_counter() - t
        for model in (m.Prompt, m.Completion, m.Comparison, m.Slot, m.Judgment):
            sync_sequence(model)
    del now
    seeded = Seeded(
        campaign=campaign,
        comparisons=comparisons,
        slots=comparisons * overlap,
        judgments=n_judgments,
        first_comparison_id=q0,
        first_slot_id=s0,
        seconds=timings,
    )
    _check_seed(seeded)
    if progress:
        log(f"seeded {slug}: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return seeded


def _check_seed(seeded: Seeded) -> None:
    """Row counts and a dangling-reference check, since the load skipped FK triggers."""
    from django.db import connection

    from annotation import models as m

    campaign = seeded.campaign
    assert m.Comparison.objects.filter(campaign=campaign).count() == seeded.comparisons
    assert m.Slot.objects.filter(campaign=campaign).count() == seeded.slots
    assert m.Judgment.objects.filter(campaign=campaign).count() == seeded.judgments
    with connection.cursor() as cursor:
        cursor.execute(
            f"""SELECT COUNT(*) FROM {m.Slot._meta.db_table} s
                LEFT JOIN {m.Comparison._meta.db_table} c ON c.id = s.comparison_id
                WHERE s.campaign_id = %s AND c.id IS NULL""",
            [campaign.pk],
        )
        assert cursor.fetchone()[0] == 0, "slots point at missing comparisons"
        cursor.execute(
            f"""SELECT COUNT(*) FROM {m.Comparison._meta.db_table} c
                LEFT JOIN {m.Completion._meta.db_table} x ON x.id = c.completion_b_id
                WHERE c.campaign_id = %s AND x.id IS NULL""",
            [campaign.pk],
        )
        assert cursor.fetchone()[0] == 0, "comparisons point at missing completions"


# -- measuring and reporting --------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "median": statistics.median(ms) if ms else float("nan"),
        "p95": pct(ms, 95),
        "p99": pct(ms, 99),
        "max": max(ms) if ms else float("nan"),
    }


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (pastes straight into docs/performance.md)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            if v != v:  # NaN
                return "-"
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    """The exact command that produced the output, to paste back into a shell."""
    env = " ".join(
        f"{k}={shlex.quote(os.environ[k])}" for k in ("BENCH_DATABASE_URL",) if os.environ.get(k)
    )
    python = os.path.relpath(sys.executable, Path.cwd()) if sys.executable else "python"
    if not python.startswith((".", "/")):
        python = sys.executable
    argv = [os.path.relpath(sys.argv[0], Path.cwd()), *sys.argv[1:]]
    return (env + " " if env else "") + shlex.join([python, *argv])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
        f"load average {load:.2f} at start"
    )


def database_version() -> str:
    from django.db import connection

    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SHOW server_version")
            return f"PostgreSQL {cursor.fetchone()[0]}"
        cursor.execute("SELECT sqlite_version()")
        return f"SQLite {cursor.fetchone()[0]}"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def save_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all processes, all cores)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class BusyMeter:
    """How busy the machine's cores were between start and stop, as a share of all cores:
    on a shared machine it says how much the figures were disturbed."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.busy0 = machine_busy_seconds()

    def share(self) -> float:
        wall = time.perf_counter() - self.t0
        return (machine_busy_seconds() - self.busy0) / (wall * (os.cpu_count() or 1))


def rss_bytes() -> int:
    """Current resident set size of this process (Linux)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
