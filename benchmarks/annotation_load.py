"""Load test of the rater API on gunicorn + PostgreSQL, with a ledger check afterwards.

Starts gunicorn (DEBUG off, production settings but plain HTTP on 127.0.0.1) against the
dedicated benchmark database, seeds two campaigns and the raters with API tokens, and drives
the REST API from one client thread per connection (httpx, or http.client with
``--client stdlib``, which costs the load generator less CPU). The load generator shares the
machine's cores with the server, as in the Label Studio measurement it is compared with
(../shared/reference/peer-bench.md: 19 judgments/s, 8.7 labels/s on 2 vCPU).

Phases, per server configuration:

(a) submit: POST /api/campaigns/<slug>/judgments/ at concurrency 1, 8 and 32, each level until
    2,000 requests or 60 s. Each submit goes out as a different rater whose one lease was
    written beforehand (the API hands a rater one lease at a time, and the database allows
    one live lease per rater and campaign), so the phase measures submits. 2% of submits are
    sent twice with the same Idempotency-Key, as a client retry would.
(b) loop: 8 raters, each doing POST .../next/ then POST .../judgments/ (lease, then submit),
    until 2,000 cycles or 60 s.
(c) ledger: from the database, after the run: every acknowledged (2xx) judgment is stored
    exactly once, retries got the same judgment back, nothing was stored that was not
    acknowledged, no comparison has more judgments than its overlap, no rater judged or held
    one comparison twice, and no slot was handed to two raters.

    .venv/bin/python benchmarks/annotation_load.py                      # gthread 4x4, httpx
    .venv/bin/python benchmarks/annotation_load.py --configs sync:4,gthread:2x4,gthread:4x4 \
        --client stdlib
    .venv/bin/python benchmarks/annotation_load.py --profile            # + py-spy breakdown

Only 127.0.0.1 is contacted. CPU per request is read from /proc (gunicorn's processes, the
PostgreSQL backends of the benchmark database, this process, and the rest of the machine).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common as c
import httpx

LABEL_STUDIO = {"submit": 19.1, "loop": 8.7}
GOALS = {"submit": 380.0, "loop": 170.0, "p99_ms_at_8": 100.0}


@dataclass
class Request:
    phase: str
    kind: str  # submit | next | retry
    seconds: float
    status: int
    rater: int = 0
    slot: int | None = None
    judgment: int | None = None
    key: str | None = None


@dataclass
class Phase:
    name: str
    concurrency: int
    wall: float = 0.0
    requests: list[Request] = field(default_factory=list)
    cycles: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs",
        default="gthread:4x4",
        help="gunicorn set-ups to measure: sync:<workers> or gthread:<workers>x<threads>",
    )
    parser.add_argument("--levels", default="1,8,32", help="submit concurrency levels")
    parser.add_argument("--loop-raters", type=int, default=8)
    parser.add_argument("--max-requests", type=int, default=2000, help="per level")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="per level")
    parser.add_argument("--retry-share", type=float, default=0.02)
    parser.add_argument("--client", choices=["httpx", "stdlib"], default="httpx")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run gunicorn under py-spy and print where its CPU time goes (slows it down)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the data afterwards")
    args = parser.parse_args()
    Client.kind = args.client
    levels = [int(x) for x in args.levels.split(",") if x]
    # Every submit goes out as a different rater (each holds one pre-made lease).
    per_level = args.max_requests + 100
    raters_needed = max(per_level, args.loop_raters)

    url = c.database_url("postgres")
    c.setup_django(url)
    header = [
        f"# annotation_load on {c.database_version()}, gunicorn {_gunicorn_version()}, "
        f"client {args.client}",
        f"# machine: {c.machine()}",
        f"# command: {c.command_line()}",
    ]
    print("\n".join(header), flush=True)

    all_submit: list[tuple[str, Phase]] = []
    all_loop: list[tuple[str, Phase]] = []
    ledgers: list[tuple[str, dict[str, Any]]] = []
    profiles: list[tuple[str, Path]] = []
    for config in [x for x in args.configs.split(",") if x]:
        c.reset_data()
        raters = c.make_users("rater", raters_needed)
        tokens = _tokens(raters)
        submit_seed = c.seed_campaign(
            slug="load-submit",
            comparisons=per_level * len(levels) + 2000,
            overlap=1,
            raters=raters,
            progress=False,
        )
        loop_seed = c.seed_campaign(
            slug="load-loop",
            comparisons=max(20_000, args.max_requests * 4),
            overlap=2,
            raters=raters,
            progress=False,
        )
        c.vacuum_analyze()
        profile = None
        if args.profile:
            c.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            profile = c.RESULTS_DIR / f"profile-{config.replace(':', '-')}-{stamp}.txt"
            profiles.append((config, profile))
        with Gunicorn(config, url, profile) as server:
            c.log(f"{config}: gunicorn up on {server.base}")
            cursor = 0  # next unused slot of the submit campaign, in id order
            seen: list[Phase] = []  # everything sent, warm-ups included, for the ledger
            for level in levels:
                leases = _prelease(submit_seed, raters[:per_level], start=cursor, seed=level)
                cursor += per_level
                phase, warm = run_submit(server, tokens, leases, level=level, args=args)
                all_submit.append((config, phase))
                seen += [warm, phase]
                _log_phase(config, phase)
            loop, warm = run_loop(server, tokens[: args.loop_raters], args=args)
            all_loop.append((config, loop))
            seen += [warm, loop]
            _log_phase(config, loop)
        ledger = check_ledger(seen, campaigns=[submit_seed.campaign, loop_seed.campaign])
        ledgers.append((config, ledger))
    if not args.keep:
        c.reset_data()
    report(all_submit, all_loop, ledgers, header)
    for config, path in profiles:
        print(f"\n## where gunicorn's CPU goes ({config}, py-spy, all phases)\n")
        print(profile_summary(path))
        print(f"\n# collapsed stacks: {path.relative_to(c.ROOT)}")


# -- server -------------------------------------------------------------------------------------


def _gunicorn_version() -> str:
    import gunicorn

    return gunicorn.__version__


class Gunicorn:
    """gunicorn serving rlhf_site.wsgi on a free port of 127.0.0.1, stopped on exit.

    With ``profile`` set, gunicorn runs under ``py-spy record --subprocesses --gil`` (every
    worker sampled at 100 Hz while it runs Python, collapsed stacks written to that path when
    gunicorn exits).
    """

    def __init__(self, config: str, database_url: str, profile: Path | None = None) -> None:
        kind, _, size = config.partition(":")
        workers, _, threads = size.partition("x")
        self.args = ["--workers", workers or "4"]
        if kind == "gthread":
            self.args += ["--worker-class", "gthread", "--threads", threads or "4"]
        elif kind != "sync":
            raise SystemExit(f"unknown gunicorn config {config!r}")
        self.env = {**os.environ, **c.bench_env(database_url)}
        self.env["SECRET_KEY"] = os.environ["SECRET_KEY"]  # the one setup_django used
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.profile = profile
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Gunicorn:
        bin_dir = Path(sys.executable).parent
        server = [
            str(bin_dir / "gunicorn"),
            "rlhf_site.wsgi",
            "--bind",
            f"127.0.0.1:{self.port}",
            *self.args,
            "--log-level",
            "warning",
            "--timeout",
            "60",
            "--graceful-timeout",
            "5",
        ]
        cmd = server
        if self.profile:
            spy = bin_dir / "py-spy"
            if not spy.exists():
                raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
            # --gil: only samples holding the GIL, i.e. Python running on a CPU; waiting for
            # PostgreSQL (psycopg releases the GIL) is not counted.
            cmd = [str(spy), "record", "--subprocesses", "--nonblocking", "--gil", "-r", "100"]
            cmd += ["-f", "raw", "-o", str(self.profile), "--", *server]
        self.proc = subprocess.Popen(cmd, cwd=c.ROOT, env=self.env)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.base}/healthz", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise SystemExit("gunicorn exited at start")
            time.sleep(0.3)
        raise SystemExit("gunicorn did not answer within 60 s")

    def __exit__(self, *exc: object) -> None:
        if not self.proc or self.proc.poll() is not None:
            return
        # Stop gunicorn's master; under py-spy that is its child, and py-spy then writes
        # the profile and exits by itself.
        master = self.proc.pid if not self.profile else (_children(self.proc.pid) or [0])[0]
        if master:
            os.kill(master, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def pids(self) -> list[int]:
        """gunicorn's master and workers (not py-spy)."""
        assert self.proc is not None
        pids = _descendants(self.proc.pid)
        return pids if self.profile else [self.proc.pid, *pids]


def _descendants(pid: int) -> list[int]:
    found = []
    for child in _children(pid):
        found += [child, *_descendants(child)]
    return found


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def _postgres_pids(dbname: str) -> list[int]:
    """Backends serving ``dbname`` (PostgreSQL puts the database in the process title)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith("postgres:") and f" {dbname} " in title:
            pids.append(int(entry.name))
    return pids


class CpuMeter:
    """CPU seconds spent by gunicorn, by the benchmark database's backends, by this process,
    and by everything else on the machine ("others": other users of the shared cores)
    between start() and stop()."""

    def __init__(self, server: Gunicorn) -> None:
        self.server = server
        self.dbname = c.database_url("postgres").rsplit("/", 1)[-1]

    def _sample(self) -> dict[str, float]:
        import resource

        me = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "app": _cpu_seconds(self.server.pids()),
            "postgres": _cpu_seconds(_postgres_pids(self.dbname)),
            "client": me.ru_utime + me.ru_stime,
            "machine": c.machine_busy_seconds(),
        }

    def start(self) -> None:
        self.before = self._sample()
        self.t0 = time.perf_counter()

    def stop(self) -> dict[str, float]:
        after = self._sample()
        used = {k: after[k] - self.before.get(k, 0.0) for k in after}
        used["others"] = max(0.0, used["machine"] - used["app"] - used["postgres"] - used["client"])
        used["wall"] = time.perf_counter() - self.t0
        return used


# -- seeding for the load -----------------------------------------------------------------------


def _tokens(raters: list[Any]) -> list[tuple[int, str]]:
    """An API token per rater, written in bulk (the same rows ``token_issue`` creates)."""
    from rest_framework.authtoken.models import Token

    Token.objects.bulk_create(
        [Token(user=r, key=Token.generate_key()) for r in raters], ignore_conflicts=True
    )
    keys = dict(Token.objects.filter(user__in=raters).values_list("user_id", "key"))
    return [(r.pk, keys[r.pk]) for r in raters]


def _prelease(seeded: c.Seeded, raters: list[Any], *, start: int, seed: int) -> dict[int, int]:
    """Lease slot ``start + n`` of the (overlap 1) submit campaign to ``raters[n]``, writing
    what ``slot_lease_next`` writes (status, rater, lease times, a random side). One slot per
    rater: the database allows a rater one live lease per campaign."""
    from datetime import timedelta

    from django.db import connection, transaction
    from django.utils import timezone

    from annotation.models import Slot

    rng = random.Random(seed)
    now = timezone.now()
    leases = {r.pk: seeded.slot_id(start + n, 0) for n, r in enumerate(raters)}
    with transaction.atomic(), connection.cursor() as cursor:
        # Leases the previous level had no time to submit go back to the pool first.
        Slot.objects.filter(campaign=seeded.campaign, status="leased").update(
            status="open", rater=None, leased_at=None, lease_expires_at=None
        )
        cursor.executemany(
            f"UPDATE {Slot._meta.db_table} SET status = 'leased', rater_id = %s, leased_at = %s,"
            " lease_expires_at = %s, left_is_a = %s WHERE id = %s AND status = 'open'",
            [
                (rater_id, now, now + timedelta(hours=2), rng.random() < 0.5, slot_id)
                for rater_id, slot_id in leases.items()
            ],
        )
    return leases


# -- load ---------------------------------------------------------------------------------------

ASPECT_ANSWERS = ("left", "right", "tie")


def _judgment_body(rng: random.Random, slot: int) -> dict[str, Any]:
    choice = rng.choices(["left", "right", "tie", "both_bad"], weights=(45, 40, 10, 5))[0]
    body: dict[str, Any] = {
        "slot": slot,
        "choice": choice,
        "aspects": {"helpfulness": rng.choice(ASPECT_ANSWERS)},
        "reason_tags": ["clearer"] if rng.random() < 0.3 else [],
        "decision_ms": rng.randint(1500, 30_000),
    }
    if choice in ("left", "right"):
        body["strength"] = rng.randint(1, 3)
    return body


class Budget:
    """Stops a phase after ``max_requests`` units of work or ``max_seconds``."""

    def __init__(self, max_requests: int, max_seconds: float) -> None:
        self.left = max_requests
        self.deadline = time.perf_counter() + max_seconds
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            if self.left <= 0 or time.perf_counter() > self.deadline:
                return False
            self.left -= 1
            return True


class Client:
    """One rater's connection: ``post(path, body, token)`` -> (status, JSON or None).

    ``httpx`` is the default. ``stdlib`` (http.client) costs the load generator several times
    less CPU per request, which matters when it shares two cores with the server it measures;
    the server side is the same either way. Network and HTTP errors come back as status 0.
    """

    kind = "httpx"

    def __init__(self, server: Gunicorn, token: str | None) -> None:
        self.headers = {"Authorization": f"Token {token}"} if token else {}
        if self.kind == "httpx":
            self.http = httpx.Client(
                base_url=server.base,
                timeout=httpx.Timeout(30.0),
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            )
        else:
            self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)

    def post(
        self, path: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        headers = {**self.headers, **(headers or {})}
        try:
            if self.kind == "httpx":
                response = self.http.post(path, json=body, headers=headers)
                status, raw = response.status_code, response.content
            else:
                payload = json.dumps(body).encode() if body is not None else b""
                headers["Content-Type"] = "application/json"
                self.conn.request("POST", path, body=payload, headers=headers)
                answer = self.conn.getresponse()
                status, raw = answer.status, answer.read()
        except (httpx.HTTPError, OSError, http.client.HTTPException):
            if self.kind != "httpx":
                self.conn.close()
            return 0, None
        return status, json.loads(raw) if raw and status < 300 else None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kind == "httpx":
            self.http.close()
        else:
            self.conn.close()


def _client(server: Gunicorn, token: str | None) -> Client:
    return Client(server, token)


def run_submit(
    server: Gunicorn,
    tokens: list[tuple[int, str]],
    leases: dict[int, int],
    *,
    level: int,
    args: argparse.Namespace,
) -> tuple[Phase, Phase]:
    """The measured phase, and the warm-up before it (kept for the ledger)."""
    phase = Phase(name="submit", concurrency=level)
    warm_phase = Phase(name="warm-up", concurrency=level)
    token_of = dict(tokens)
    work = [(rater_id, token_of[rater_id], slot_id) for rater_id, slot_id in leases.items()]
    # The first 100 leases warm the workers on this exact endpoint (not measured).
    _drive_submits(server, work[:100], level, Budget(100, 30), warm_phase, args)
    meter = CpuMeter(server)
    meter.start()
    start = time.perf_counter()
    budget = Budget(args.max_requests, args.max_seconds)
    _drive_submits(server, work[100:], level, budget, phase, args)
    phase.wall = time.perf_counter() - start
    phase.cpu = meter.stop()
    return phase, warm_phase


def _drive_submits(
    server: Gunicorn,
    work: list[tuple[int, str, int]],
    concurrency: int,
    budget: Budget,
    phase: Phase,
    args: argparse.Namespace,
) -> None:
    """``concurrency`` client threads share ``work`` (rater, token, leased slot) round robin;
    each keeps one connection and sends one request at a time."""
    lock = threading.Lock()

    def run(share: list[tuple[int, str, int]], seed: int) -> None:
        rng = random.Random(seed)
        records: list[Request] = []
        with _client(server, None) as client:
            for rater_id, token, slot_id in share:
                if not budget.take():
                    break
                body = _judgment_body(rng, slot_id)
                key = uuid.uuid4().hex
                record = _post_judgment(client, "submit", body, key, rater_id, token)
                records.append(record)
                if record.status in (200, 201) and rng.random() < args.retry_share:
                    # A client that lost the response and retries with the same key.
                    records.append(_post_judgment(client, "retry", body, key, rater_id, token))
        with lock:
            phase.requests.extend(records)

    threads = [
        threading.Thread(target=run, args=(work[t::concurrency], t)) for t in range(concurrency)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _post_judgment(
    client: Client,
    kind: str,
    body: dict[str, Any],
    key: str,
    rater_id: int,
    token: str | None = None,
) -> Request:
    slug = "load-loop" if kind == "loop" else "load-submit"
    t0 = time.perf_counter()
    headers = {"Idempotency-Key": key}
    if token:
        headers["Authorization"] = f"Token {token}"
    status, data = client.post(f"/api/campaigns/{slug}/judgments/", body, headers)
    judgment = data.get("id") if data else None
    return Request(
        phase="loop" if kind == "loop" else "submit",
        kind="submit" if kind == "loop" else kind,
        seconds=time.perf_counter() - t0,
        status=status,
        rater=rater_id,
        slot=body["slot"],
        judgment=judgment,
        key=key,
    )


def run_loop(
    server: Gunicorn, tokens: list[tuple[int, str]], *, args: argparse.Namespace
) -> tuple[Phase, Phase]:
    """The measured loop, and the warm-up before it (kept for the ledger)."""
    phase = Phase(name="loop", concurrency=len(tokens))
    warm_phase = Phase(name="warm-up", concurrency=len(tokens))
    lock = threading.Lock()

    def work(rater_id: int, token: str, budget: Budget, into: Phase) -> None:
        rng = random.Random(rater_id)
        records: list[Request] = []
        cycles: list[float] = []
        with _client(server, token) as client:
            while budget.take():
                t0 = time.perf_counter()
                status, data = client.post("/api/campaigns/load-loop/next/")
                slot = data["slot"] if status == 200 and data else None
                t1 = time.perf_counter()
                records.append(Request("loop", "next", t1 - t0, status, rater_id, slot))
                if slot is None:
                    break  # 204: nothing left for this rater (or an error, counted)
                submit = _post_judgment(
                    client, "loop", _judgment_body(rng, slot), uuid.uuid4().hex, rater_id
                )
                records.append(submit)
                cycles.append(time.perf_counter() - t0)
        with lock:
            into.requests.extend(records)
            into.cycles.extend(cycles)

    def drive(budget: Budget, into: Phase) -> None:
        threads = [
            threading.Thread(target=work, args=(rid, tok, budget, into)) for rid, tok in tokens
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    drive(Budget(50, 30), warm_phase)
    meter = CpuMeter(server)
    meter.start()
    start = time.perf_counter()
    drive(Budget(args.max_requests, args.max_seconds), phase)
    phase.wall = time.perf_counter() - start
    phase.cpu = meter.stop()
    return phase, warm_phase


def _log_phase(config: str, phase: Phase) -> None:
    ok = [r for r in phase.requests if 200 <= r.status < 300]
    c.log(
        f"{config}: {phase.name} c={phase.concurrency}: {len(phase.requests)} requests "
        f"({len(ok)} 2xx) in {phase.wall:.1f}s"
    )


# -- ledger -------------------------------------------------------------------------------------


def check_ledger(phases: list[Phase], *, campaigns: list[Any]) -> dict[str, Any]:
    """Compare what the clients were told with what the database holds."""
    from django.db.models import Count, F

    from annotation.models import Judgment, Slot

    submits = [r for p in phases for r in p.requests if r.kind in ("submit", "retry")]
    acked = [r for r in submits if r.status in (200, 201)]
    first = {r.key: r for r in acked if r.kind == "submit"}
    retries = [r for r in acked if r.kind == "retry"]
    acked_ids = {r.judgment for r in acked}
    stored = {
        j["id"]: j
        for j in Judgment.objects.filter(campaign__in=campaigns).values(
            "id", "slot_id", "rater_id", "idempotency_key"
        )
    }
    missing = [r for r in acked if r.judgment not in stored]
    wrong = [
        r
        for r in acked
        if r.judgment in stored
        and (stored[r.judgment]["slot_id"] != r.slot or stored[r.judgment]["rater_id"] != r.rater)
    ]
    retry_mismatch = [
        r for r in retries if first.get(r.key) is None or first[r.key].judgment != r.judgment
    ]
    unacknowledged = set(stored) - acked_ids
    over_overlap = (
        Judgment.objects.filter(campaign__in=campaigns)
        .values("comparison_id", "comparison__judgments_wanted")
        .annotate(n=Count("id"))
        .filter(n__gt=F("comparison__judgments_wanted"))
        .count()
    )
    rater_twice = (
        Judgment.objects.filter(campaign__in=campaigns)
        .values("comparison_id", "rater_id")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
        .count()
    )
    slots_twice = (
        Slot.objects.filter(campaign__in=campaigns, rater__isnull=False)
        .values("comparison_id", "rater_id")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
        .count()
    )
    # Leases handed out in the loop: a slot must never go to two raters (no lease expired
    # during the run: leases last 10 minutes), and a rater never gets two slots of one pair.
    leases: dict[int, set[int]] = {}
    for p in phases:
        for r in p.requests:
            if r.kind == "next" and r.slot is not None:
                leases.setdefault(r.slot, set()).add(r.rater)
    double_leased = sum(1 for raters in leases.values() if len(raters) > 1)
    comparison_of = dict(
        Slot.objects.filter(id__in=list(leases)).values_list("id", "comparison_id")
    )
    per_rater_comparison: dict[tuple[int, int], set[int]] = {}
    for slot_id, raters in leases.items():
        for rater in raters:
            per_rater_comparison.setdefault((rater, comparison_of[slot_id]), set()).add(slot_id)
    rater_two_slots = sum(1 for s in per_rater_comparison.values() if len(s) > 1)
    errors: dict[int, int] = {}
    for p in phases:
        for r in p.requests:
            if not 200 <= r.status < 300:
                errors[r.status] = errors.get(r.status, 0) + 1
    return {
        "acknowledged": len(acked) - len(retries),
        "retries": len(retries),
        "stored": len(stored),
        "missing": len(missing),
        "wrong_row": len(wrong),
        "retry_mismatch": len(retry_mismatch),
        "stored_unacknowledged": len(unacknowledged),
        "over_overlap": over_overlap,
        "rater_twice": rater_twice,
        "slots_twice": slots_twice,
        "leases": len(leases),
        "double_leased": double_leased,
        "rater_two_slots": rater_two_slots,
        "errors": errors,
    }


def _others_share(phase: Phase) -> str:
    """How busy other processes kept the shared cores during the phase (0% = quiet)."""
    wall = phase.cpu.get("wall") or phase.wall
    cores = os.cpu_count() or 1
    return f"{100 * phase.cpu.get('others', 0.0) / (wall * cores):.0f}%"


# -- profile ----------------------------------------------------------------------------------

# A sample belongs to the first step whose function is on its stack (outermost wins).
STEPS = (
    ("token authentication", ("TokenAuthentication.authenticate",)),
    ("campaign + roles lookup", ("campaign_with_roles", "campaign_and_roles_for")),
    ("input validation", ("Serializer.is_valid",)),
    ("slot_for_rater query", ("slot_for_rater",)),
    ("judgment_submit service", ("judgment_submit",)),
    ("slot_lease_next service", ("slot_lease_next",)),
    ("slot_card query", ("slot_card",)),
    ("output serialisation", ("Serializer.data", "Serializer.to_representation")),
    ("JSON rendering", ("JSONRenderer.render",)),
    ("end of request (close/health check)", ("close_old_connections",)),
)
LAYERS = (
    ("psycopg (send, wait, adapt)", ("psycopg/",)),
    ("ORM (SQL building, rows to objects)", ("django/db/",)),
    ("DRF", ("rest_framework/",)),
    ("json", ("json/",)),
    ("Django, other", ("django/",)),
    ("annotation/ code", ("annotation/",)),
    ("gunicorn", ("gunicorn/",)),
)


def profile_summary(path: Path) -> str:
    """Summarise py-spy's collapsed stacks: share of samples per endpoint, per step of the
    request, and per library layer (by the innermost frame)."""
    if not path.exists():
        return "(no profile written)"
    endpoints: dict[str, int] = {}
    steps: dict[str, int] = {}
    layers: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit() or " (" not in stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        names = [f.split(" (", 1)[0] for f in frames]
        total += count
        in_django = any(n.endswith("WSGIHandler.__call__") for n in names)
        endpoint = next(
            (n.split(".")[0] for n in names if n.endswith("Api.post") or n.endswith("Api.get")),
            "(Django/DRF outside the view method)" if in_django else "(gunicorn, outside Django)",
        )
        endpoints[endpoint] = endpoints.get(endpoint, 0) + count
        step = next(
            (label for label, keys in STEPS if any(k in n for k in keys for n in names)),
            "middleware, routing, DRF dispatch" if in_django else "gunicorn",
        )
        steps[step] = steps.get(step, 0) + count
        innermost = frames[-1]
        layer = next(
            (label for label, keys in LAYERS if any(k in innermost for k in keys)), "other"
        )
        layers[layer] = layers.get(layer, 0) + count
    if not total:
        return "(empty profile)"

    def rows(counts: dict[str, int]) -> list[tuple[str, str]]:
        ordered = sorted(counts.items(), key=lambda kv: -kv[1])
        return [(k, f"{100 * v / total:.1f}%") for k, v in ordered]

    return "\n\n".join(
        [
            f"{total:,} samples of workers running Python (GIL held)",
            c.table(["endpoint", "share"], rows(endpoints)),
            c.table(["step of the request", "share"], rows(steps)),
            c.table(["layer (innermost frame)", "share"], rows(layers)),
        ]
    )


# -- report -------------------------------------------------------------------------------------


def report(
    submit: list[tuple[str, Phase]],
    loop: list[tuple[str, Phase]],
    ledgers: list[tuple[str, dict[str, Any]]],
    header: list[str],
) -> None:
    def per_request_ms(phase: Phase, key: str, n: int) -> float:
        return 1000 * phase.cpu.get(key, float("nan")) / n if n else float("nan")

    print("\n## (a) submit: POST /api/campaigns/<slug>/judgments/\n")
    rows = []
    for config, p in submit:
        first = [r for r in p.requests if r.kind == "submit"]
        ok = [r for r in p.requests if 200 <= r.status < 300]
        s = c.summary_ms([r.seconds for r in first])
        rows.append(
            (
                config,
                p.concurrency,
                len(ok) / p.wall,
                s["median"],
                s["p95"],
                s["p99"],
                len(p.requests) - len(ok),
                per_request_ms(p, "app", len(p.requests)),
                per_request_ms(p, "postgres", len(p.requests)),
                per_request_ms(p, "client", len(p.requests)),
                _others_share(p),
            )
        )
    print(
        c.table(
            [
                "gunicorn",
                "c",
                "judgments/s",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "non-2xx",
                "app CPU ms/req",
                "PG CPU ms/req",
                "client CPU ms/req",
                "others' CPU",
            ],
            rows,
        )
    )
    print("\n## (b) rater loop: POST .../next/ then POST .../judgments/\n")
    rows = []
    for config, p in loop:
        nexts = [r for r in p.requests if r.kind == "next"]
        subs = [r for r in p.requests if r.kind == "submit"]
        cyc = c.summary_ms(p.cycles)
        rows.append(
            (
                config,
                p.concurrency,
                len(p.cycles) / p.wall,
                f"{cyc['median']:.1f} / {cyc['p95']:.1f} / {cyc['p99']:.1f}",
                c.summary_ms([r.seconds for r in nexts])["p99"],
                c.summary_ms([r.seconds for r in subs])["p99"],
                sum(1 for r in p.requests if not 200 <= r.status < 300),
                per_request_ms(p, "app", len(p.cycles)),
                per_request_ms(p, "postgres", len(p.cycles)),
                _others_share(p),
            )
        )
    print(
        c.table(
            [
                "gunicorn",
                "raters",
                "labels/s",
                "cycle p50 / p95 / p99 ms",
                "next p99 ms",
                "submit p99 ms",
                "non-2xx",
                "app CPU ms/label",
                "PG CPU ms/label",
                "others' CPU",
            ],
            rows,
        )
    )
    print("\n## (c) ledger, from the database after the run\n")
    print(
        c.table(
            [
                "gunicorn",
                "acknowledged",
                "stored",
                "missing",
                "stored, not acked",
                "retries (same id back)",
                "over overlap",
                "rater twice on a pair",
                "slot to two raters",
                "errors",
            ],
            [
                (
                    config,
                    led["acknowledged"],
                    led["stored"],
                    led["missing"] + led["wrong_row"],
                    led["stored_unacknowledged"],
                    f"{led['retries']} ({led['retries'] - led['retry_mismatch']})",
                    led["over_overlap"],
                    led["rater_twice"] + led["slots_twice"] + led["rater_two_slots"],
                    led["double_leased"],
                    led["errors"] or "none",
                )
                for config, led in ledgers
            ],
        )
    )
    ok = all(
        led["missing"] == led["wrong_row"] == led["retry_mismatch"] == 0
        and led["stored_unacknowledged"] == led["over_overlap"] == 0
        and led["rater_twice"] == led["slots_twice"] == led["rater_two_slots"] == 0
        and led["double_leased"] == 0
        for _, led in ledgers
    )
    print(f"\nledger: {'OK' if ok else 'FAILED'}")

    best_submit = max(
        (len([r for r in p.requests if 200 <= r.status < 300]) / p.wall for _, p in submit),
        default=0.0,
    )
    best_loop = max((len(p.cycles) / p.wall for _, p in loop), default=0.0)
    at8 = [
        c.summary_ms([r.seconds for r in p.requests if r.kind == "submit"])["p99"]
        for _, p in submit
        if p.concurrency == 8
    ]
    print(
        "\nagainst Label Studio (19.1 judgments/s, 8.7 labels/s) and the goals "
        "(380 judgments/s, 170 labels/s, p99 < 100 ms at 8 raters):\n"
        f"- best submit: {best_submit:.0f} judgments/s = {best_submit / LABEL_STUDIO['submit']:.1f}x "
        f"Label Studio ({'meets' if best_submit >= GOALS['submit'] else 'misses'} the goal)\n"
        f"- best loop: {best_loop:.0f} labels/s = {best_loop / LABEL_STUDIO['loop']:.1f}x "
        f"Label Studio ({'meets' if best_loop >= GOALS['loop'] else 'misses'} the goal)\n"
        f"- submit p99 at c=8: {', '.join(f'{v:.0f} ms' for v in at8)}"
    )
    raw = {
        "header": header,
        "submit": [
            {
                "config": cfg,
                "c": p.concurrency,
                "wall": p.wall,
                "cpu": p.cpu,
                "latencies": [(r.kind, r.status, r.seconds) for r in p.requests],
            }
            for cfg, p in submit
        ],
        "loop": [
            {"config": cfg, "c": p.concurrency, "wall": p.wall, "cpu": p.cpu, "cycles": p.cycles}
            for cfg, p in loop
        ],
        "ledger": ledgers,
    }
    path = c.save_results("annotation_load", raw)
    print(f"\n# raw results: {path.relative_to(c.ROOT)}")


if __name__ == "__main__":
    main()
