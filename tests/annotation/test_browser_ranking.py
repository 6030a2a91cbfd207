"""The ranking page in a real browser (headless Chromium through Playwright), with the
fixtures of ``test_browser_rater``: ranking by keyboard and by mouse, the next task swapped in
without a page load, no CSP violation and no dialog from hostile outputs.

Skipped when /usr/bin/chromium is missing or cannot start.
"""

from __future__ import annotations

import pytest

from annotation.models import Ranking, RankingSlot, Role
from annotation.services.rankings import ranking_tasks_create
from tests.annotation.test_browser_rater import (  # noqa: F401
    SCREENS,
    browser,
    session_factory,
)
from tests.factories import (
    CampaignFactory,
    CompletionFactory,
    MembershipFactory,
    PromptFactory,
    UserFactory,
)

pytestmark = pytest.mark.browser

HOSTILE = "<img src=x onerror=alert('xss-rank')> <script>alert('xss-rank-2')</script>"


def _campaign(k: int = 4, tasks: int = 2):
    campaign = CampaignFactory(name="Rank the answers")
    for n in range(tasks):
        prompt = PromptFactory(
            campaign=campaign,
            messages=[
                {"role": "system", "content": "You are a concise tutor."},
                {"role": "user", "content": f"Explain recursion ({n})."},
            ],
        )
        texts = [f"Answer {i} to question {n}: **recursion** calls itself." for i in range(k)]
        texts[0] = HOSTILE
        ids = [CompletionFactory(prompt=prompt, text=t).pk for t in texts]
        ranking_tasks_create(campaign=campaign, prompt_id=prompt.pk, completion_ids=ids)
    rater = UserFactory()
    MembershipFactory(campaign=campaign, user=rater, role=Role.RATER)
    return campaign, rater


def _open(s, campaign) -> None:
    s.page.goto(f"{s.base_url}/rate/{campaign.slug}/rank/")
    s.page.wait_for_selector("#rank-root[data-ready='1']", state="attached")


def _card(page) -> str | None:
    return page.evaluate(
        "(() => { const f = document.querySelector('form.ranker');"
        " return f ? f.dataset.card : null; })()"
    )


def _wait_for_next(page, previous: str) -> None:
    page.wait_for_function(
        "prev => { const f = document.querySelector('form.ranker');"
        " return f ? f.dataset.card !== prev : !!document.querySelector('[data-state=empty]'); }",
        arg=previous,
    )


def _ranked_labels(page) -> list[str]:
    return page.eval_on_selector_all(".rank-item-label", "els => els.map(e => e.textContent)")


def test_rater_ranks_by_keyboard_then_mouse_without_page_loads(session_factory, transactional_db):  # noqa: F811
    campaign, rater = _campaign(k=4, tasks=2)
    s = session_factory()
    s.login(rater.username)
    _open(s, campaign)
    page = s.page
    page.evaluate("window.__marker = 'still-here'")
    loads_before = len(s.navigations)

    # Keyboard: Enter before the ranking is complete is refused in place.
    first = _card(page)
    page.keyboard.press("3")
    page.keyboard.press("Enter")
    page.wait_for_selector("#rate-status:has-text('Rank every output first')")
    # 1, then a mistake taken back with Backspace, then 4: the last output is ranked for us.
    page.keyboard.press("2")
    page.keyboard.press("Backspace")
    page.keyboard.press("1")
    page.keyboard.press("4")
    assert _ranked_labels(page) == ["Output 3", "Output 1", "Output 4", "Output 2"]
    assert page.inner_text("[data-position='3'] [data-badge]") == "#1"
    try:
        SCREENS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENS / "rank-desktop.png"), full_page=True)
    except OSError:
        pass  # screenshots are for people
    page.wait_for_timeout(120)  # a measurable decision time
    page.keyboard.press("Enter")
    _wait_for_next(page, first)
    assert page.is_visible("[data-state=saved]")

    # Mouse: "Next best" on 2 then 4, move 4 up, reset, build again and click Submit.
    second = _card(page)
    page.click("[data-position='2'] [data-pick]")
    page.click("[data-position='4'] [data-pick]")
    page.click("[data-reset]")
    assert _ranked_labels(page) == []
    page.click("[data-position='2'] [data-pick]")
    page.click("[data-position='4'] [data-pick]")
    page.click("[data-position='1'] [data-pick]")  # and 3 is placed last
    page.click(".rank-item:nth-child(2) button[aria-label='Move output 4 up']")
    assert _ranked_labels(page) == ["Output 4", "Output 2", "Output 1", "Output 3"]
    page.click("[data-submit]")
    page.wait_for_selector("text=Nothing left to rank")

    assert page.evaluate("window.__marker") == "still-here", "the page was reloaded"
    assert len(s.navigations) == loads_before
    slots = {str(slot.pk): slot for slot in RankingSlot.objects.filter(rater=rater)}
    rankings = {str(r.slot_id): r for r in Ranking.objects.filter(rater=rater)}
    assert set(rankings) == {first, second}
    shown = slots[first].shown_order
    assert rankings[first].order == [shown[2], shown[0], shown[3], shown[1]]
    assert rankings[first].decision_ms >= 100
    shown = slots[second].shown_order
    assert rankings[second].order == [shown[3], shown[1], shown[0], shown[2]]
    assert rankings[second].shown_order == shown
    assert s.dialogs == []
    assert s.violations() == []
    assert page.evaluate("document.querySelectorAll('.md img, .md script').length") == 0
