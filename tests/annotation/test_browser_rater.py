"""The rater flow in a real browser: headless Chromium through Playwright, against
pytest-django's live server.

Skipped when /usr/bin/chromium is missing or cannot start (a fresh clone still passes).
Every test listens for ``securitypolicyviolation`` and for JavaScript dialogs and expects
none: the CSP is enforced and our own scripts must live within it, and an XSS corpus must
not be able to pop an ``alert``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from annotation.models import CritiqueMode, Judgment, Role, Slot
from annotation.services.items import PairSpec, comparisons_create, critique_create
from tests.annotation.test_xss import CORPUS, SHORT, _import_corpus
from tests.factories import (
    CampaignFactory,
    CompletionFactory,
    MembershipFactory,
    PromptFactory,
    UserFactory,
)

# Playwright's sync API runs an event loop in this thread; Django's async-safety check would
# then refuse the ORM calls the test makes between browser steps.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
PASSWORD = "correct-horse-battery"  # tests.factories.UserFactory's
SCREENS = Path(os.environ.get("SCREENSHOT_DIR", "/tmp/screens"))
DESKTOP = {"width": 1366, "height": 900}
PHONE = {"width": 390, "height": 844}

# Runs before any page script, outside the page's CSP: records violations and dialogs.
RECORDER = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", function (e) {
  window.__csp.push(e.violatedDirective + " " + e.blockedURI);
  console.error("CSP-VIOLATION " + e.violatedDirective + " " + e.blockedURI);
});
"""


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("no Chromium at /usr/bin/chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed")
    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
    except Exception as exc:  # no display libraries, sandbox trouble, ...
        playwright.stop()
        pytest.skip(f"Chromium cannot start: {exc}")
    yield chromium
    chromium.close()
    playwright.stop()


class Session:
    """One browser context with its own cookies, recording what must never happen."""

    def __init__(self, browser, base_url: str, viewport: dict[str, int] = DESKTOP) -> None:
        self.context = browser.new_context(viewport=viewport)
        self.context.add_init_script(RECORDER)
        self.page = self.context.new_page()
        self.base_url = base_url
        self.dialogs: list[str] = []
        self.console_csp: list[str] = []
        self.navigations: list[str] = []
        self.page.on("dialog", self._dialog)
        self.page.on("console", self._console)
        self.page.on(
            "framenavigated",
            lambda frame: frame == self.page.main_frame and self.navigations.append(frame.url),
        )

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _console(self, message) -> None:
        text = message.text
        if "CSP-VIOLATION" in text or "Content Security Policy" in text:
            self.console_csp.append(text)

    def violations(self) -> list[str]:
        return [*self.page.evaluate("window.__csp || []"), *self.console_csp]

    def login(self, username: str) -> None:
        self.page.goto(f"{self.base_url}/accounts/login/")
        self.page.fill("input[name=username]", username)
        self.page.fill("input[name=password]", PASSWORD)
        self.page.click("button[type=submit]")
        self.page.wait_for_selector("h1:has-text('Your campaigns')")

    def open_campaign(self, campaign) -> None:
        self.page.click(f"a[href='/rate/{campaign.slug}/']")
        self.page.wait_for_selector("form.judge, [data-state]")
        # rate.js is deferred: keys pressed before it has bound its listeners would be lost.
        self.page.wait_for_selector("#rate-root[data-ready='1']", state="attached")

    def card_id(self) -> str | None:
        return self.page.evaluate(
            "(() => { const f = document.querySelector('form.judge');"
            " return f ? f.dataset.card : null; })()"
        )

    def wait_for_next(self, previous: str) -> None:
        self.page.wait_for_function(
            "prev => { const f = document.querySelector('form.judge');"
            " return f ? f.dataset.card !== prev : !!document.querySelector('[data-state]'); }",
            arg=previous,
        )

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def session_factory(browser, live_server):
    sessions: list[Session] = []

    def make(viewport: dict[str, int] = DESKTOP) -> Session:
        session = Session(browser, live_server.url, viewport)
        sessions.append(session)
        return session

    yield make
    for session in sessions:
        session.close()


def _rater_for(campaign):
    rater = UserFactory()
    MembershipFactory(campaign=campaign, user=rater, role=Role.RATER)
    return rater


def _realistic_campaign(comparisons: int = 3):
    campaign = CampaignFactory(
        name="Helpful and harmless, round 3",
        critique_mode=CritiqueMode.ALWAYS,
        strength_scale=3,
        guidelines=(
            "## How to judge\n\nPrefer the response that is **correct**, then the one that is "
            "*clearer*.\n\n- A wrong answer is worse than a short one.\n- Mark unsafe content "
            "with the flag."
        ),
    )
    specs = []
    for n in range(comparisons):
        prompt = PromptFactory(
            campaign=campaign,
            messages=[
                {"role": "system", "content": "You are a concise Python tutor."},
                {"role": "user", "content": "How do I reverse a list?"},
                {"role": "assistant", "content": "Use slicing or `list.reverse()`."},
                {"role": "user", "content": f"Show me both, with an example ({n})."},
            ],
        )
        x = CompletionFactory(
            prompt=prompt,
            text=(
                "Two ways:\n\n```python\nxs = [1, 2, 3]\nys = xs[::-1]   # new list\n"
                "xs.reverse()     # in place\n```\n\nSlicing leaves `xs` unchanged; "
                "`reverse()` changes it and returns `None`."
            ),
        )
        y = CompletionFactory(
            prompt=prompt,
            text=(
                "You can call `reversed(xs)`, which gives an iterator, so wrap it: "
                "`list(reversed(xs))`. There is also `xs.sort(reverse=True)`, which reverses "
                "the list."
            ),
        )
        critique_create(completion=x, critic="critic-v1", text="Correct and complete.")
        critique_create(
            completion=y,
            critic="critic-v1",
            text="`sort(reverse=True)` sorts descending; it does **not** reverse the list.",
        )
        specs.append(PairSpec(prompt_id=prompt.pk, completion_x=x.pk, completion_y=y.pk))
    comparisons_create(campaign=campaign, pairs=specs)
    return campaign


def test_rater_judges_by_keyboard_and_mouse_without_page_loads(session_factory, transactional_db):
    campaign = _realistic_campaign(comparisons=3)
    rater = _rater_for(campaign)
    s = session_factory()
    s.login(rater.username)
    s.open_campaign(campaign)
    page = s.page
    page.evaluate("window.__marker = 'still-here'")
    loads_before = len(s.navigations)

    # Keyboard: 1 picks response 1, Shift+2 the strength, Enter submits.
    first = s.card_id()
    page.keyboard.press("1")
    assert page.is_checked("input[name=choice][value=left]")
    page.keyboard.press("Shift+2")
    assert page.is_checked("input[name=strength][value='2']")
    page.wait_for_timeout(150)  # a measurable decision time
    page.keyboard.press("Enter")
    s.wait_for_next(first)
    assert page.is_visible("[data-state=saved]")

    # Mouse: click a choice and the Submit button; a double click still stores one row.
    second = s.card_id()
    assert second != first
    page.click("label.option-right")
    page.dblclick(".actions button.primary")
    s.wait_for_next(second)

    # Keyboard again: tie, which disables the strength question, then Enter.
    third = s.card_id()
    page.keyboard.press("t")
    assert page.is_disabled("input[name=strength][value='1']")
    page.keyboard.press("Enter")
    s.wait_for_next(third)
    page.wait_for_selector("text=Nothing left to rate")

    assert page.evaluate("window.__marker") == "still-here", "the page was reloaded"
    assert len(s.navigations) == loads_before
    judgments = {j.slot_id: j for j in Judgment.objects.filter(rater=rater)}
    assert len(judgments) == 3
    j1, j2, j3 = (judgments[int(card)] for card in (first, second, third))
    assert j1.choice == ("a" if j1.left_was_a else "b")
    assert j1.strength == 2
    assert j2.choice == ("b" if j2.left_was_a else "a")
    assert j3.choice == "tie"
    assert j3.strength is None
    for judgment in (j1, j2, j3):
        assert judgment.decision_ms is not None
        assert 0 < judgment.decision_ms < 120_000
        assert judgment.critique_shown
    assert j1.decision_ms >= 100
    assert s.violations() == []
    assert s.dialogs == []


def test_help_opens_with_question_mark_and_keys_pause_while_typing(
    session_factory, transactional_db
):
    campaign = _realistic_campaign(comparisons=1)
    rater = _rater_for(campaign)
    s = session_factory()
    s.login(rater.username)
    s.open_campaign(campaign)
    page = s.page
    page.keyboard.press("?")
    assert page.is_visible("#help")
    assert page.is_visible("#help >> text=Shift")
    page.keyboard.press("Escape")
    assert not page.is_visible("#help")
    page.click("textarea[name=rationale]")
    page.keyboard.type("1 is better")
    assert not page.is_checked("input[name=choice][value=left]"), "a shortcut fired while typing"
    page.keyboard.press("Enter")  # a new line, not a submit
    assert Judgment.objects.count() == 0
    page.click("label.option-left")
    page.click("textarea[name=rationale]")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("text=Nothing left to rate")
    assert Judgment.objects.get().rationale.startswith("1 is better")
    assert s.violations() == []


def test_missing_choice_is_refused_in_place(session_factory, transactional_db):
    campaign = _realistic_campaign(comparisons=1)
    rater = _rater_for(campaign)
    s = session_factory()
    s.login(rater.username)
    s.open_campaign(campaign)
    page = s.page
    # Skip the browser's own check to reach the server's: it answers 422 into the error line.
    page.evaluate(
        "document.querySelectorAll('input[name=choice]').forEach(i => i.required = false)"
    )
    page.fill("textarea[name=rationale]", "kept after the error")
    page.keyboard.press("Escape")
    page.click(".actions button.primary")
    page.wait_for_selector("#card-errors [data-field=choice]")
    assert page.input_value("textarea[name=rationale]") == "kept after the error"
    assert Judgment.objects.count() == 0
    assert s.violations() == []


def test_lost_session_mid_task_goes_to_the_login_page(session_factory, transactional_db):
    campaign = _realistic_campaign(comparisons=2)
    rater = _rater_for(campaign)
    s = session_factory()
    s.login(rater.username)
    s.open_campaign(campaign)
    s.context.clear_cookies(name="sessionid")
    s.page.keyboard.press("1")
    s.page.keyboard.press("Enter")
    s.page.wait_for_url(f"**/accounts/login/?next=%2Frate%2F{campaign.slug}%2F")
    assert s.page.is_visible("input[name=password]")
    assert Judgment.objects.count() == 0
    # Logging in again lands back on the same card.
    s.page.fill("input[name=username]", rater.username)
    s.page.fill("input[name=password]", PASSWORD)
    s.page.click("button[type=submit]")
    s.page.wait_for_selector("form.judge")
    assert int(s.card_id()) == Slot.objects.get(rater=rater, status="leased").pk
    assert s.violations() == []


def test_xss_corpus_pops_no_dialog_and_breaks_no_policy(session_factory, transactional_db):
    campaign = CampaignFactory(
        name="</script><script>alert('name')</script>",
        critique_mode=CritiqueMode.ALWAYS,
        guidelines="\n\n".join(CORPUS),
        aspects=SHORT,
        reason_tags=SHORT,
        flag_options=SHORT,
    )
    _import_corpus(campaign)
    rater = _rater_for(campaign)
    s = session_factory()
    s.login(rater.username)
    s.open_campaign(campaign)
    page = s.page
    page.click("details.guidelines summary")
    for link in page.query_selector_all(".md a")[:5]:
        link.hover()
    first = s.card_id()
    page.keyboard.press("2")
    page.keyboard.press("Enter")
    s.wait_for_next(first)
    page.click("details.guidelines summary")
    page.mouse.move(10, 10)
    page.wait_for_timeout(300)  # give anything that would fire on load or hover its chance
    active = page.evaluate(
        "document.querySelectorAll('.md script, .md [onerror], .md [onload], .md [hx-get],"
        " .md [hx-post], .md [data-hx-post], .md img, .md svg, .md iframe').length"
    )
    assert active == 0
    assert s.dialogs == []
    assert s.violations() == []
    assert Judgment.objects.filter(rater=rater).count() == 1
    assert page.evaluate("document.title").startswith("Rate · </script>")


def test_rate_page_layout_side_by_side_on_desktop_and_stacked_on_phone(
    session_factory, transactional_db
):
    campaign = _realistic_campaign(comparisons=1)
    rater = _rater_for(campaign)
    boxes = {}
    for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        s = session_factory(viewport)
        s.login(rater.username)
        s.open_campaign(campaign)
        outputs = s.page.query_selector_all("[data-output]")
        boxes[name] = [o.bounding_box() for o in outputs]
        width = s.page.evaluate("document.documentElement.scrollWidth")
        assert width <= viewport["width"], f"horizontal scrolling on {name}"
        try:
            SCREENS.mkdir(parents=True, exist_ok=True)
            s.page.screenshot(path=str(SCREENS / f"rate-{name}.png"), full_page=True)
        except OSError:
            pass  # screenshots are for people; the layout is asserted below
        assert s.violations() == []
    left, right = boxes["desktop"]
    assert abs(left["y"] - right["y"]) < 2, "desktop: side by side"
    assert right["x"] >= left["x"] + left["width"]
    top, bottom = boxes["phone"]
    assert abs(top["x"] - bottom["x"]) < 2, "phone: stacked"
    assert bottom["y"] >= top["y"] + top["height"]
