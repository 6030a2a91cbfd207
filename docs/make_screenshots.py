"""Take the screenshots of docs/demo.md from a running demo, in headless Chromium.

Everything on the pictures is real: the script signs in as the demo's rater and ML staff
user, walks the pages a newcomer walks, and (unless told not to) starts a training round
through the campaign's form and follows it until it has finished. Nothing is posted that a
person would not post: the rater only ever presses *Skip* to get past comparisons that are
not the kind a picture needs, so no judgment is invented.

Run it on the machine that runs the demo, after ``make run`` printed the passwords:

    .venv/bin/python docs/make_screenshots.py --base-url http://127.0.0.1:8000 \
        --password-mlstaff ... --password-rater ...

(or set DEMO_PASSWORD_MLSTAFF and DEMO_PASSWORD_RATER). It reads the demo's database with
the same settings as ``make run`` (DEBUG=1, var/secret_key, SQLite in var/ unless
DATABASE_URL says otherwise) for two things the pages rightly never show: which model wrote
the two responses of a rater's comparison, and the stage timings it prints at the end.

A round takes about 7 minutes on two CPU cores. A round already running is followed rather
than a second one refused; ``--round ID`` starts nothing and takes the pictures of that
(finished) round instead, leaving the three mid-round pictures (round-started,
run-reward-live, round-live) of an earlier run as they are.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from playwright.sync_api import ViewportSize

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
VIEWPORT: ViewportSize = {"width": 1280, "height": 800}
# GitHub renders the pictures inline; past this size a page of them loads slowly.
MAX_BYTES = 250_000
ROUND_TIMEOUT_S = 30 * 60


def django_setup() -> None:
    """Open the demo's database with ``make run``'s settings. Playwright's sync API runs an
    event loop in this thread, which Django's async-safety check would otherwise take for an
    async context and refuse every query."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "rlhf_site.settings")
    os.environ.setdefault("DEBUG", "1")
    os.environ.setdefault("SECRET_KEY_FILE", str(ROOT / "var" / "secret_key"))
    os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


class Card(NamedTuple):
    """What the rater's page rightly hides about a comparison: who wrote each answer."""

    source_a: str
    source_b: str
    round_a: int | None
    round_b: int | None
    same_text: bool


def card_of(slot_id: int) -> Card:
    """The two completions of a leased slot's comparison: sources, rounds, equal or not."""
    from annotation.models import Slot

    slot = Slot.objects.select_related(
        "comparison__completion_a__source", "comparison__completion_b__source"
    ).get(pk=slot_id)
    a, b = slot.comparison.completion_a, slot.comparison.completion_b
    return Card(a.source.name, b.source.name, a.round_number, b.round_number, a.text == b.text)


def policy_sources() -> set[str]:
    """Names of the sources that models of the loop write under (base and trained policies)."""
    from training.models import ModelVersion

    return set(
        ModelVersion.objects.filter(source__isnull=False).values_list("source__name", flat=True)
    )


def round_policy_source(round_id: int) -> str | None:
    from training.models import Round

    round_obj = Round.objects.select_related("policy_version__source").get(pk=round_id)
    version = round_obj.policy_version
    return version.source.name if version and version.source else None


def round_outcome(round_id: int) -> tuple[str, str]:
    from training.models import Round

    round_obj = Round.objects.get(pk=round_id)
    return round_obj.status, round_obj.error


def round_timings(round_id: int) -> list[str]:
    """One line per run of the round and one for the round: kind, status, seconds."""
    from training.models import Round

    round_obj = Round.objects.get(pk=round_id)
    lines = []
    for run in round_obj.runs.order_by("pk"):
        lines.append(f"  run {run.pk:>3} {run.kind:<9} {run.status:<10} {_seconds(run)}")
    lines.append(
        f"  round {round_obj.number} {round_obj.status}: {_seconds(round_obj)}"
        f" ({round_obj.completions_created} completions,"
        f" {round_obj.comparisons_created} comparisons, metrics {round_obj.metrics})"
    )
    return lines


def _seconds(row: Any) -> str:
    if row.started_at is None or row.finished_at is None:
        return "not finished"
    return f"{(row.finished_at - row.started_at).total_seconds():.0f} s"


@dataclass
class Shooter:
    """Writes the pictures and keeps what went wrong on the pages along the way."""

    out: Path
    problems: list[str] = field(default_factory=list)
    written: list[tuple[str, int]] = field(default_factory=list)

    def watch(self, page: Any) -> None:
        """Record script errors, console errors and failed requests of ``page``."""

        def on_error(exc: Exception) -> None:
            self.problems.append(f"{page.url}: script error {exc}")

        def on_console(msg: Any) -> None:
            # No favicon is served: the browser's request for one is not a fault of a page.
            if msg.type == "error" and not msg.location.get("url", "").endswith("/favicon.ico"):
                self.problems.append(f"{page.url}: console error {msg.text}")

        def on_response(response: Any) -> None:
            # 409 is an answer the pages show (a paused queue, a refused round), not a fault.
            harmless = response.status == 409 or response.url.endswith("/favicon.ico")
            if response.status >= 400 and not harmless:
                self.problems.append(f"{response.url}: HTTP {response.status}")

        page.on("pageerror", on_error)
        page.on("console", on_console)
        page.on("response", on_response)

    def shot(
        self,
        page: Any,
        name: str,
        *,
        selector: str | None = None,
        height: int | None = None,
        start: str | None = None,
    ) -> None:
        """A PNG of one element (``selector``), or of the page from its top (or from the top
        of ``start``) down to ``height`` pixels (the viewport when not given), cut shorter
        until it fits MAX_BYTES: the top of a page is what the reader needs."""
        path = self.out / f"{name}.png"
        page.wait_for_load_state("networkidle")
        if selector:
            page.locator(selector).first.screenshot(path=str(path))
        else:
            top = 0
            if start:
                box = page.locator(start).first.bounding_box()
                scrolled = page.evaluate("window.scrollY")
                top = max(0, int(box["y"] + scrolled) - 16) if box else 0
            page_height = page.evaluate("document.documentElement.scrollHeight")
            clip_height = min(height or VIEWPORT["height"], page_height - top)
            while True:
                clip = {"x": 0, "y": top, "width": VIEWPORT["width"], "height": clip_height}
                page.screenshot(path=str(path), full_page=True, clip=clip)
                if path.stat().st_size <= MAX_BYTES or clip_height <= VIEWPORT["height"] // 2:
                    break
                clip_height = int(clip_height * 0.85)
        size = path.stat().st_size
        self.written.append((path.name, size))
        note = "" if size <= MAX_BYTES else f"  (over {MAX_BYTES // 1000} KB)"
        print(
            f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
            f" ({size // 1000} KB){note}"
        )


def log_in(page: Any, base: str, username: str, password: str) -> None:
    page.goto(f"{base}/accounts/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_load_state("networkidle")
    if "/accounts/login/" in page.url:
        raise SystemExit(
            f"could not sign in as {username}: wrong password? (seed_demo prints them)"
        )


def open_rating(page: Any, base: str, slug: str) -> None:
    page.goto(f"{base}/rate/{slug}/")
    page.wait_for_selector("form.judge, [data-state]")
    # rate.js is deferred: a key pressed before it bound its listeners would be lost.
    page.wait_for_selector("#rate-root[data-ready='1']", state="attached")


def card_id(page: Any) -> int | None:
    raw = page.evaluate(
        "(() => { const f = document.querySelector('form.judge');"
        " return f ? f.dataset.card : null; })()"
    )
    return int(raw) if raw else None


def lease_until(
    page: Any, wanted: Callable[[int], bool], *, limit: int = 200, what: str = ""
) -> int:
    """Skip comparisons until the card on screen is one ``wanted`` accepts; returns its slot.
    Skipping gives the comparison back to the pool; nothing is judged."""
    for _ in range(limit):
        current = card_id(page)
        if current is None:
            break
        if wanted(current):
            return current
        page.click("form.judge .actions button.secondary")  # Skip
        page.wait_for_function(
            "prev => { const f = document.querySelector('form.judge');"
            " return f ? f.dataset.card !== String(prev) : !!document.querySelector('[data-state]'); }",
            arg=current,
        )
    raise SystemExit(f"no comparison {what} reached this rater after skipping {limit}")


def shoot_rating(
    page: Any,
    shooter: Shooter,
    base: str,
    slug: str,
    name: str,
    wanted: Callable[[int], bool],
    what: str,
) -> None:
    open_rating(page, base, slug)
    slot = lease_until(page, wanted, what=what)
    card = card_of(slot)
    print(
        f"slot {slot}: {card.source_a} (round {card.round_a})"
        f" vs {card.source_b} (round {card.round_b})"
    )
    page.evaluate("window.scrollTo(0, 0)")
    shooter.shot(page, name, height=1500)


def round_link(page: Any) -> tuple[int, str] | None:
    """The newest round on the campaign page: its id and status."""
    row = page.locator("table.rounds tbody tr").first
    if row.count() == 0:
        return None
    href = row.locator("a").first.get_attribute("href") or ""
    status = row.locator(".badge").first.inner_text().strip().lower()
    return path_id(href), status


def path_id(href: str) -> int:
    """The id at the end of a page's path, e.g. 7 in /training/rounds/7/."""
    return int(href.rstrip("/").rsplit("/", 1)[-1])


def wait_js(page: Any, expression: str, timeout_s: float, arg: Any = None) -> None:
    page.wait_for_function(expression, arg=arg, timeout=timeout_s * 1000, polling=1000)


def follow_round(page: Any, shooter: Shooter, base: str, round_id: int, live: bool) -> None:
    """Pictures of the round and of its runs: mid-run when ``live``, then when finished."""
    round_url = f"{base}/training/rounds/{round_id}/"
    page.goto(round_url)
    if live:
        shooter.shot(page, "round-started")
        # The reward run's page while it trains: progress bar and live plots.
        wait_js(
            page,
            "() => !!document.querySelector('li[data-stage=reward] .stage-run a')",
            300,
        )
        href = page.locator("li[data-stage=reward] .stage-run a").first.get_attribute("href")
        page.goto(f"{base}{href}")
        wait_js(
            page,
            "() => { const p = document.querySelector('#run-live progress');"
            " const status = document.querySelector('#run-live').dataset.status;"
            " return (p && Number(p.value) >= 0.5)"
            " || !['queued', 'running'].includes(status); }",
            600,
        )
        shooter.shot(page, "run-reward-live", height=1400)
        # The round while its policy trains, the reward model done.
        page.goto(round_url)
        wait_js(
            page,
            "() => { const r = document.querySelector('#round-live');"
            " return r.dataset.stage !== 'reward' || r.dataset.status !== 'running'; }",
            600,
        )
        wait_js(
            page,
            "() => { const p = document.querySelector('li[data-stage=policy] progress');"
            " return (p && Number(p.value) >= 0.25)"
            " || document.querySelector('#round-live').dataset.stage !== 'policy'; }",
            600,
        )
        shooter.shot(page, "round-live", height=1400)
    wait_js(
        page,
        "() => ['succeeded', 'failed', 'cancelled'].includes("
        "document.querySelector('#round-live').dataset.status)",
        ROUND_TIMEOUT_S,
    )
    page.goto(round_url)
    shooter.shot(page, "round-done", height=1200)
    for stage, name in (("reward", "run-reward-done"), ("policy", "run-policy-done")):
        link = page.locator(f"li[data-stage={stage}] .stage-run a").first
        if link.count():
            href = link.get_attribute("href")
            page.goto(f"{base}{href}")
            shooter.shot(page, name, height=1400)
            page.goto(round_url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--campaign", default="demo")
    parser.add_argument("--rater", default="rater1")
    parser.add_argument("--mlstaff", default="mlstaff")
    parser.add_argument(
        "--password-rater",
        default=os.environ.get("DEMO_PASSWORD_RATER", ""),
        help="(or DEMO_PASSWORD_RATER)",
    )
    parser.add_argument(
        "--password-mlstaff",
        default=os.environ.get("DEMO_PASSWORD_MLSTAFF", ""),
        help="(or DEMO_PASSWORD_MLSTAFF)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "demo")
    parser.add_argument(
        "--round",
        type=int,
        default=None,
        metavar="ID",
        help="start no round: take the pictures of this finished round (its id, as in"
        " /training/rounds/ID/)",
    )
    args = parser.parse_args(argv)
    if not args.password_rater or not args.password_mlstaff:
        parser.error("both passwords are needed (seed_demo prints new ones)")
    if not CHROMIUM.exists():
        parser.error(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    base = args.base_url.rstrip("/")
    slug = args.campaign
    args.out.mkdir(parents=True, exist_ok=True)
    django_setup()

    from playwright.sync_api import sync_playwright

    shooter = Shooter(out=args.out)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        rater_ctx = browser.new_context(viewport=VIEWPORT)
        staff_ctx = browser.new_context(viewport=VIEWPORT)
        rater, staff = rater_ctx.new_page(), staff_ctx.new_page()
        shooter.watch(rater)
        shooter.watch(staff)

        # 1. The rater: two SmolLM2 answers with the critic's critiques.
        log_in(rater, base, args.rater, args.password_rater)
        shooter.shot(rater, "home")
        models = policy_sources()

        def smollm2(slot: int) -> bool:
            # Two samples of one model, as the demo's first candidates are.
            card = card_of(slot)
            return card.source_a == card.source_b and card.source_a in models and not card.same_text

        shoot_rating(rater, shooter, base, slug, "rate-smollm2", smollm2, "written by models")
        rater.keyboard.press("?")
        rater.wait_for_selector("dialog#help[open]")
        shooter.shot(rater, "rate-help")
        rater.keyboard.press("Escape")

        # 2. ML staff: the runs, the campaign's loop page, a round.
        log_in(staff, base, args.mlstaff, args.password_mlstaff)
        staff.goto(f"{base}/training/")
        shooter.shot(staff, "training-index", height=1100)
        campaign_url = f"{base}/training/campaigns/{slug}/"
        staff.goto(campaign_url)
        shooter.shot(staff, "campaign-loop")
        shooter.shot(staff, "round-form", selector="#start-round")
        shooter.shot(staff, "schedule", selector="#schedule")
        newest = round_link(staff)
        live = False
        if newest and newest[1] in ("queued", "running"):
            round_id, live = newest[0], True
            print(f"round {round_id} is {newest[1]}: following it")
        elif args.round is not None:
            round_id = args.round
        else:
            staff.click("#start-round button.primary")
            staff.wait_for_url("**/training/rounds/*/")
            round_id = path_id(staff.url)
            live = True
            print(f"started round {round_id} with the form's defaults")
        started = time.monotonic()
        follow_round(staff, shooter, base, round_id, live)
        if live:
            print(f"round {round_id} followed for {time.monotonic() - started:.0f} s")
        status, error = round_outcome(round_id)
        if status != "succeeded":
            shooter.problems.append(f"round {round_id} {status}: {error}")

        # 3. The models: the list, the new policy's lineage, the two policies side by side.
        staff.goto(f"{base}/training/rounds/{round_id}/")
        new_policy = staff.locator("#round-facts dt:has-text('New policy') + dd a").first
        policy_href = new_policy.get_attribute("href") if new_policy.count() else None
        staff.goto(f"{base}/training/models/")
        shooter.shot(staff, "models")
        if policy_href is None:
            print(f"round {round_id} made no policy: no lineage or comparison pictures")
        else:
            staff.goto(f"{base}{policy_href}")
            shooter.shot(staff, "policy-lineage", height=1000)
            # The lineage lists the ancestors oldest first: the first is the base model.
            root = staff.locator("ol.lineage li a").first
            if root.count():
                root_id = path_id(root.get_attribute("href") or "")
                policy_id = path_id(policy_href)
                staff.goto(f"{base}/training/models/compare/?a={root_id}&b={policy_id}")
                shooter.shot(staff, "compare", start="#compare-outputs", height=1300)

            # 4. The rater again: the new policy's answers are in the queue.
            policy_source = round_policy_source(round_id)
            if policy_source:

                def from_round(slot: int) -> bool:
                    # Two policies that barely differ can write the very same answer; a
                    # pair of different answers shows what the rater is asked to do.
                    card = card_of(slot)
                    return policy_source in (card.source_a, card.source_b) and not card.same_text

                shoot_rating(
                    rater,
                    shooter,
                    base,
                    slug,
                    "rate-new-round",
                    from_round,
                    f"with an answer of {policy_source}",
                )
        browser.close()

    print("\nStage timings of the round (from the database):")
    print("\n".join(round_timings(round_id)))
    too_big = [(name, size) for name, size in shooter.written if size > MAX_BYTES]
    for name, size in too_big:
        print(f"too big: {name} {size // 1000} KB")
    if shooter.problems:
        print("\nProblems seen on the pages:")
        for problem in dict.fromkeys(shooter.problems):
            print(f"  {problem}")
    return 1 if shooter.problems else 0


if __name__ == "__main__":
    sys.exit(main())
