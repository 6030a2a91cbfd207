"""The quality page and its API: who gets in, what the page shows (escaped), and that the API
answers with the selector's numbers."""

from __future__ import annotations

import json
import re

import pytest
from django.urls import reverse
from rest_framework.test import APIClient

from annotation.models import CritiqueMode, Membership, Role
from annotation.reports import campaign_quality_report
from annotation.views.quality import gold_vs_reliability_plot, left_rate_plot, wilson_interval
from tests.annotation.test_reports import build, judge, truth
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

XSS_NAME = "<script>alert('q')</script>"


def page_url(campaign) -> str:
    return reverse("annotation:campaign_quality", kwargs={"slug": campaign.slug})


def api_url(campaign) -> str:
    return reverse("annotation:api-quality", kwargs={"slug": campaign.slug})


@pytest.fixture
def judged():
    """An experiment campaign with gold: two careful raters, and an always-left rater whose
    name is a script tag; the admin, a rater member, and ML staff."""
    campaign, comparisons = build(
        n=32,
        overlap=3,
        gold={i: truth(i) for i in range(0, 32, 4)},
        critique_mode=CritiqueMode.EXPERIMENT,
    )
    careful = [UserFactory(username="careful-1"), UserFactory(username="careful-2")]
    lefty = UserFactory(username=XSS_NAME)
    for i, comparison in enumerate(comparisons):
        left_is_a = i % 4 < 2
        for k, rater in enumerate(careful):
            judge(rater, comparison, truth(i), left_is_a=left_is_a, critique_shown=(i + k) % 2 == 0)
        judge(
            lefty,
            comparison,
            "a" if left_is_a else "b",
            left_is_a=left_is_a,
            critique_shown=i % 2 == 1,
            decision_ms=800,
        )
    admin, member, ml = UserFactory(), UserFactory(), UserFactory()
    Membership.objects.create(campaign=campaign, user=admin, role=Role.ADMIN)
    Membership.objects.create(campaign=campaign, user=member, role=Role.RATER)
    Membership.objects.create(campaign=campaign, user=ml, role=Role.ML_STAFF)
    Membership.objects.create(campaign=campaign, user=lefty, role=Role.RATER)
    return campaign, admin, member, ml, lefty


# -- the page -----------------------------------------------------------------------------------


def test_page_shows_figures_plots_and_flags_with_rater_names_escaped(judged, client):
    campaign, admin, *_ = judged
    client.force_login(admin)

    response = client.get(page_url(campaign))

    assert response.status_code == 200
    html = response.content.decode()
    assert "<script>alert(" not in html
    assert "&lt;script&gt;alert(&#x27;q&#x27;)&lt;/script&gt;" in html
    assert 'style="' not in html  # CSP: looks come from static/css/quality.css
    assert "css/quality.css" in html
    assert html.count("<svg") == 2
    assert 'class="reference"' in html  # the 50% line
    # The always-left rater's row is highlighted, and the row under it says why.
    rows = re.search(
        r'<tr class="suspicious">(.*?)</tr>\s*<tr class="suspicious flags-row">(.*?)</tr>',
        html,
        re.S,
    )
    assert rows is not None
    assert "&lt;script&gt;" in rows.group(1)
    assert "chose the left side in 100% of 32 decisive judgments" in rows.group(2)
    assert html.count('class="suspicious flags-row"') == 1
    assert "Critique experiment" in html
    assert "Raw agreement" in html


def test_page_offers_no_critique_section_when_there_is_no_experiment(client):
    campaign, comparisons = build(n=2, overlap=1)
    admin = UserFactory()
    Membership.objects.create(campaign=campaign, user=admin, role=Role.ADMIN)
    judge(UserFactory(), comparisons[0], "a")
    client.force_login(admin)
    html = client.get(page_url(campaign)).content.decode()
    assert "Critique experiment" not in html
    assert "agreement needs overlap" in html


def test_page_of_a_campaign_without_judgments_renders(client):
    campaign, _ = build(n=2)
    admin = UserFactory()
    Membership.objects.create(campaign=campaign, user=admin, role=Role.ADMIN)
    client.force_login(admin)
    response = client.get(page_url(campaign))
    assert response.status_code == 200
    assert "No judgments yet." in response.content.decode()


def test_page_window_narrows_the_figures_and_rejects_a_reversed_window(judged, client):
    campaign, admin, *_ = judged
    client.force_login(admin)
    future = client.get(page_url(campaign), {"since": "2999-01-01"})
    assert future.status_code == 200
    assert future.context["report"].n_judgments == 0
    today = client.get(page_url(campaign), {"until": "2999-01-01"})
    assert today.context["report"].n_judgments == 96
    reversed_window = client.get(page_url(campaign), {"since": "2026-02-01", "until": "2026-01-01"})
    assert reversed_window.status_code == 400


@pytest.mark.parametrize(("who", "status"), [("member", 403), ("ml", 403), ("outsider", 404)])
def test_page_is_for_the_campaigns_admins_only(judged, client, who, status):
    campaign, _admin, member, ml, _ = judged
    user = {"member": member, "ml": ml, "outsider": UserFactory()}[who]
    client.force_login(user)
    assert client.get(page_url(campaign)).status_code == status


def test_page_sends_anonymous_callers_to_log_in_and_is_get_only(judged, client):
    campaign, admin, *_ = judged
    assert client.get(page_url(campaign))["Location"].startswith(reverse("login"))
    client.force_login(admin)
    assert client.post(page_url(campaign)).status_code == 405


def test_campaign_detail_links_to_the_quality_page(judged, client):
    campaign, admin, *_ = judged
    client.force_login(admin)
    detail = client.get(reverse("annotation:campaign_detail", kwargs={"slug": campaign.slug}))
    assert page_url(campaign) in detail.content.decode()


# -- plot geometry ------------------------------------------------------------------------------


def test_wilson_interval_matches_the_published_formula():
    low, high = wilson_interval(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    low, high = wilson_interval(0, 10)
    assert low == 0.0
    assert high == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(0, 0) is None


def test_left_rate_plot_puts_an_unbiased_rater_on_the_fifty_percent_line(judged):
    campaign, *_ = judged
    report = campaign_quality_report(campaign=campaign, n_resamples=50)
    plot = left_rate_plot(report)
    by_label = {row.label: row for row in plot.rows}
    assert by_label["careful-1"].x == plot.reference_x
    assert by_label[XSS_NAME].x == plot.x1  # 100%: the far right
    assert by_label[XSS_NAME].suspicious
    for row in plot.rows:
        assert plot.x0 <= row.low <= row.x <= row.high <= plot.x1
    scatter = gold_vs_reliability_plot(report)
    assert len(scatter.points) == 3
    for point in scatter.points:
        assert scatter.left <= point.x <= scatter.right
        assert scatter.top <= point.y <= scatter.bottom


# -- the API ------------------------------------------------------------------------------------


def api_as(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def test_api_answers_with_the_selectors_numbers(judged):
    campaign, admin, *_ = judged
    body = json.loads(api_as(admin).get(api_url(campaign)).content)
    report = campaign_quality_report(campaign=campaign)

    assert body["n_judgments"] == report.n_judgments == 96
    assert body["agreement"]["raw"] == pytest.approx(report.agreement.raw)
    assert body["agreement"]["raw_ci"] == pytest.approx(list(report.agreement.raw_ci))
    assert body["agreement"]["alpha_ordinal"] == pytest.approx(report.agreement.alpha_ordinal)
    assert body["dawid_skene"]["classes"] == list(report.dawid_skene.classes)
    assert [r["rater_id"] for r in body["raters"]] == [r.rater_id for r in report.raters]
    for got, want in zip(body["raters"], report.raters, strict=True):
        assert got["username"] == want.username
        assert got["weight"] == pytest.approx(want.weight)
        assert got["reliability"] == pytest.approx(want.reliability)
        assert got["stats"]["left_rate"] == want.stats.left_rate
        assert got["stats"]["gold_accuracy"] == want.stats.gold_accuracy
        assert got["flags"] == list(want.flags)
        assert got["suspicious"] == want.suspicious
        assert got["confusion"]["a"]["a"] == pytest.approx(want.confusion["a"]["a"])
    critique = body["critique"]
    assert critique["shown"]["n"] == report.critique.shown.n
    assert critique["gold_uplift"]["difference"] == pytest.approx(
        report.critique.gold_uplift.difference
    )
    assert critique["time_uplift"]["low"] == pytest.approx(report.critique.time_uplift.low)
    assert body["n_suspicious"] == report.n_suspicious >= 1


def test_api_window_and_its_validation(judged):
    campaign, admin, *_ = judged
    client = api_as(admin)
    body = client.get(api_url(campaign), {"since": "2999-01-01T00:00:00Z"}).json()
    assert body["n_judgments"] == 0
    assert body["critique"]["shown"]["n"] == 0  # experiment campaign: arms shown, empty
    bad = client.get(
        api_url(campaign), {"since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}
    )
    assert bad.status_code == 400
    assert "until" in bad.json()


@pytest.mark.parametrize(("who", "status"), [("member", 403), ("ml", 403), ("outsider", 404)])
def test_api_is_for_the_campaigns_admins_only(judged, who, status):
    campaign, _admin, member, ml, _ = judged
    user = {"member": member, "ml": ml, "outsider": UserFactory()}[who]
    assert api_as(user).get(api_url(campaign)).status_code == status


def test_schema_documents_the_quality_endpoint(judged):
    _campaign, admin, *_ = judged
    schema = json.loads(api_as(admin).get("/api/schema/?format=json").content)
    operation = schema["paths"]["/api/campaigns/{slug}/quality/"]["get"]
    assert {p["name"] for p in operation["parameters"]} >= {"slug", "since", "until"}
    assert "QualityReport" in schema["components"]["schemas"]
