"""K-wise ranking: tasks, leases, submits, pair expansion, the API, the page and the export."""

from __future__ import annotations

import json
import random
import re
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from django.db import IntegrityError, connection, transaction
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from annotation.exceptions import AnnotationError, CampaignNotActive, InvalidJudgment, LeaseLost
from annotation.formats.export import ranking_records
from annotation.models import (
    CampaignStatus,
    Ranking,
    RankingSlot,
    RankingTask,
    Role,
    SlotStatus,
)
from annotation.services.rankings import (
    positions_to_order,
    ranking_lease_next,
    ranking_pairs,
    ranking_submit,
    ranking_tasks_build,
    ranking_tasks_create,
)
from tests.annotation.test_xss import audit
from tests.factories import (
    CampaignFactory,
    CompletionFactory,
    MembershipFactory,
    PromptFactory,
    UserFactory,
)

HTMX = {"HX-Request": "true"}


def make_ranking_campaign(*, prompts: int = 2, k: int = 4, overlap: int = 1, **fields):
    """An active campaign with ``prompts`` prompts of ``k`` completions each, one ranking
    task per prompt."""
    campaign = CampaignFactory(overlap=overlap, **fields)
    tasks = []
    for _ in range(prompts):
        prompt = PromptFactory(campaign=campaign)
        ids = [CompletionFactory(prompt=prompt).pk for _ in range(k)]
        task, created = ranking_tasks_create(
            campaign=campaign, prompt_id=prompt.pk, completion_ids=ids
        )
        assert created
        tasks.append(task)
    return campaign, tasks


def rater_of(campaign):
    rater = UserFactory()
    MembershipFactory(campaign=campaign, user=rater, role=Role.RATER)
    return rater


# -- pair expansion -------------------------------------------------------------------------------


def test_a_ranking_of_four_expands_into_six_pairs_best_beats_all_below():
    assert ranking_pairs([30, 10, 40, 20]) == [
        (30, 10),
        (30, 40),
        (30, 20),
        (10, 40),
        (10, 20),
        (40, 20),
    ]
    for k in range(3, 10):
        assert len(ranking_pairs(list(range(k)))) == k * (k - 1) // 2


def test_positions_map_to_completions_through_the_shown_order():
    shown = [40, 10, 30, 20]  # position 1 showed completion 40, ...
    assert positions_to_order([2, 4, 1, 3], shown_order=shown) == [10, 20, 40, 30]
    for bad in ([1, 2, 3], [1, 1, 2, 3], [0, 1, 2, 3], [1, 2, 3, 5], "1234", [True, 2, 3, 4]):
        with pytest.raises(InvalidJudgment) as err:
            positions_to_order(bad, shown_order=shown)
        assert err.value.field == "order"


# -- tasks ----------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_set_of_completions_is_one_task_whatever_the_order():
    campaign = CampaignFactory(overlap=2)
    prompt = PromptFactory(campaign=campaign)
    ids = [CompletionFactory(prompt=prompt).pk for _ in range(3)]
    task, created = ranking_tasks_create(campaign=campaign, prompt_id=prompt.pk, completion_ids=ids)
    again, created_again = ranking_tasks_create(
        campaign=campaign, prompt_id=prompt.pk, completion_ids=list(reversed(ids))
    )
    assert created
    assert not created_again
    assert again.pk == task.pk
    assert task.completions == sorted(ids)
    assert task.key == ",".join(str(i) for i in sorted(ids))
    assert task.slots.count() == 2 == task.judgments_wanted
    with pytest.raises(IntegrityError), transaction.atomic():
        RankingTask.objects.create(
            campaign=campaign,
            prompt=prompt,
            completions=task.completions,
            key=task.key,
            judgments_wanted=1,
        )


@pytest.mark.django_db
def test_task_creation_refuses_bad_sets_naming_the_field():
    campaign = CampaignFactory()
    prompt = PromptFactory(campaign=campaign)
    other = PromptFactory(campaign=campaign)
    ids = [CompletionFactory(prompt=prompt).pk for _ in range(10)]
    stranger = CompletionFactory(prompt=other).pk
    foreign = PromptFactory()  # another campaign's prompt
    cases = [
        (prompt.pk, ids[:2], "completion_ids: a ranking shows 3 to 9"),
        (prompt.pk, ids, "completion_ids: a ranking shows 3 to 9"),
        (prompt.pk, [ids[0], ids[0], ids[1]], "completion_ids: must be distinct"),
        (prompt.pk, [*ids[:2], stranger], f"completion {stranger} does not answer"),
        (foreign.pk, ids[:3], "prompt_id:"),
    ]
    for prompt_id, completion_ids, message in cases:
        with pytest.raises(AnnotationError, match=message):
            ranking_tasks_create(
                campaign=campaign, prompt_id=prompt_id, completion_ids=completion_ids
            )
    assert RankingTask.objects.count() == 0


@pytest.mark.django_db
def test_build_makes_one_task_per_prompt_with_enough_candidates_and_skips_existing():
    campaign = CampaignFactory(overlap=1)
    rich = PromptFactory(campaign=campaign)
    poor = PromptFactory(campaign=campaign)
    rich_ids = {CompletionFactory(prompt=rich).pk for _ in range(6)}
    for _ in range(3):
        CompletionFactory(prompt=poor)
    assert ranking_tasks_build(campaign=campaign, k=4, seed=1) == 1
    task = RankingTask.objects.get()
    assert task.prompt_id == rich.pk
    assert len(task.completions) == 4
    assert set(task.completions) <= rich_ids
    assert ranking_tasks_build(campaign=campaign, k=4, seed=2) == 0  # built twice: harmless
    assert ranking_tasks_build(campaign=campaign, k=3, seed=1) == 2  # another size is new work
    with pytest.raises(AnnotationError, match="k:"):
        ranking_tasks_build(campaign=campaign, k=2)


# -- leasing and submitting -----------------------------------------------------------------------


@pytest.mark.django_db
def test_lease_renews_the_held_task_with_the_same_shown_order():
    campaign, _tasks = make_ranking_campaign(prompts=2, k=5)
    rater = rater_of(campaign)
    now = timezone.now()
    first = ranking_lease_next(rater=rater, campaign=campaign, now=now, rng=random.Random(1))
    assert first is not None
    assert sorted(first.shown_order) == first.task.completions
    later = now + timedelta(seconds=30)
    again = ranking_lease_next(rater=rater, campaign=campaign, now=later, rng=random.Random(2))
    assert again.pk == first.pk
    assert again.shown_order == first.shown_order
    assert again.lease_expires_at == later + timedelta(seconds=campaign.lease_seconds)
    assert RankingSlot.objects.filter(rater=rater, status=SlotStatus.LEASED).count() == 1


@pytest.mark.django_db
def test_shown_order_is_drawn_per_lease_and_copied_onto_the_ranking():
    campaign, (_task,) = make_ranking_campaign(prompts=1, k=6, overlap=8)
    orders = set()
    for _ in range(8):
        rater = rater_of(campaign)
        slot = ranking_lease_next(rater=rater, campaign=campaign)
        orders.add(tuple(slot.shown_order))
        result = ranking_submit(
            rater=rater, campaign=campaign, slot_id=slot.pk, order=list(slot.shown_order)
        )
        assert result.ranking.shown_order == slot.shown_order
    assert len(orders) > 1  # 8 draws of 720 orders: all equal has odds ~1e-20


@pytest.mark.django_db
def test_submit_checks_the_order_is_a_permutation_of_the_task():
    campaign, (task,) = make_ranking_campaign(prompts=1, k=4)
    rater = rater_of(campaign)
    slot = ranking_lease_next(rater=rater, campaign=campaign)
    ids = task.completions
    stranger = CompletionFactory().pk
    for bad in (ids[:3], [*ids, ids[0]], [ids[0], *ids[:3]], [*ids[:3], stranger], "x", None):
        with pytest.raises(InvalidJudgment) as err:
            ranking_submit(rater=rater, campaign=campaign, slot_id=slot.pk, order=bad)
        assert err.value.field == "order"
    assert Ranking.objects.count() == 0
    slot.refresh_from_db()
    assert slot.status == SlotStatus.LEASED


@pytest.mark.django_db
def test_replay_and_idempotency_key_return_the_stored_ranking():
    campaign, _tasks = make_ranking_campaign(prompts=2, k=3)
    rater = rater_of(campaign)
    slot = ranking_lease_next(rater=rater, campaign=campaign)
    order = list(reversed(slot.task.completions))
    first = ranking_submit(
        rater=rater, campaign=campaign, slot_id=slot.pk, order=order, idempotency_key="key-1"
    )
    assert first.created
    # A double click with another order: the stored ranking wins.
    again = ranking_submit(
        rater=rater, campaign=campaign, slot_id=slot.pk, order=slot.task.completions
    )
    assert not again.created
    assert again.ranking.pk == first.ranking.pk
    assert again.ranking.order == order
    # The same key on the next task is refused, not silently mapped to the first ranking.
    nxt = ranking_lease_next(rater=rater, campaign=campaign)
    with pytest.raises(InvalidJudgment) as err:
        ranking_submit(
            rater=rater,
            campaign=campaign,
            slot_id=nxt.pk,
            order=nxt.task.completions,
            idempotency_key="key-1",
        )
    assert err.value.field == "idempotency_key"
    assert Ranking.objects.count() == 1
    slot.refresh_from_db()
    assert slot.status == SlotStatus.FILLED
    assert slot.filled_at is not None


@pytest.mark.django_db
def test_a_rater_ranks_a_task_once_and_overlap_is_never_exceeded():
    campaign, (task,) = make_ranking_campaign(prompts=1, k=3, overlap=2)
    raters = [rater_of(campaign) for _ in range(4)]
    got = []
    for rater in raters:
        slot = ranking_lease_next(rater=rater, campaign=campaign)
        if slot is None:
            continue
        ranking_submit(rater=rater, campaign=campaign, slot_id=slot.pk, order=task.completions)
        got.append(rater)
        # The same rater asking again gets nothing: they ranked this task.
        assert ranking_lease_next(rater=rater, campaign=campaign) is None
    assert len(got) == 2
    assert Ranking.objects.filter(task=task).count() == 2
    # The database refuses a forged second ranking by the same rater.
    with pytest.raises(IntegrityError), transaction.atomic():
        Ranking.objects.create(
            campaign=campaign,
            task=task,
            slot=RankingSlot.objects.create(
                campaign=campaign, task=task, index=9, status=SlotStatus.FILLED, rater=raters[3]
            ),
            rater=got[0],
            order=task.completions,
            shown_order=task.completions,
            guidelines_version=1,
        )


@pytest.mark.django_db
def test_database_refuses_two_live_ranking_leases_for_one_rater():
    campaign, _tasks = make_ranking_campaign(prompts=2, k=3)
    rater = rater_of(campaign)
    slot = ranking_lease_next(rater=rater, campaign=campaign)
    other = RankingSlot.objects.exclude(pk=slot.pk).get()
    with pytest.raises(IntegrityError), transaction.atomic():
        RankingSlot.objects.filter(pk=other.pk).update(
            status=SlotStatus.LEASED,
            rater=rater,
            lease_expires_at=timezone.now() + timedelta(minutes=5),
        )
    with pytest.raises(IntegrityError), transaction.atomic():
        RankingSlot.objects.filter(pk=other.pk).update(status=SlotStatus.LEASED)  # no rater


@pytest.mark.django_db
def test_an_expired_lease_goes_to_another_rater_and_the_late_submit_is_refused():
    campaign, (task,) = make_ranking_campaign(prompts=1, k=3)
    slow, fast = rater_of(campaign), rater_of(campaign)
    now = timezone.now()
    slot = ranking_lease_next(rater=slow, campaign=campaign, now=now)
    assert ranking_lease_next(rater=fast, campaign=campaign, now=now) is None
    later = now + timedelta(seconds=campaign.lease_seconds + 1)
    taken = ranking_lease_next(rater=fast, campaign=campaign, now=later)
    assert taken.pk == slot.pk
    with pytest.raises(LeaseLost):
        ranking_submit(rater=slow, campaign=campaign, slot_id=slot.pk, order=task.completions)
    # A ranking given against an order since redrawn is refused, never stored scrambled.
    with pytest.raises(LeaseLost):
        ranking_submit(
            rater=fast,
            campaign=campaign,
            slot_id=slot.pk,
            order=task.completions,
            expected_shown_order=[*taken.shown_order[1:], taken.shown_order[0]],
        )
    assert ranking_submit(
        rater=fast, campaign=campaign, slot_id=slot.pk, order=task.completions
    ).created


@pytest.mark.django_db
def test_paused_campaign_leases_nothing_and_archived_accepts_no_submit():
    campaign, (task,) = make_ranking_campaign(prompts=1, k=3)
    rater = rater_of(campaign)
    slot = ranking_lease_next(rater=rater, campaign=campaign)
    campaign.status = CampaignStatus.PAUSED
    with pytest.raises(CampaignNotActive):
        ranking_lease_next(rater=rater, campaign=campaign)
    campaign.status = CampaignStatus.ARCHIVED
    with pytest.raises(CampaignNotActive):
        ranking_submit(rater=rater, campaign=campaign, slot_id=slot.pk, order=task.completions)


@pytest.mark.django_db
def test_rankings_are_append_only_on_postgresql():
    if connection.vendor != "postgresql":
        pytest.skip("the trigger is PostgreSQL's")
    campaign, (task,) = make_ranking_campaign(prompts=1, k=3)
    rater = rater_of(campaign)
    slot = ranking_lease_next(rater=rater, campaign=campaign)
    ranking = ranking_submit(
        rater=rater, campaign=campaign, slot_id=slot.pk, order=task.completions
    ).ranking
    with pytest.raises(IntegrityError, match="append-only"), transaction.atomic():
        Ranking.objects.filter(pk=ranking.pk).update(order=list(reversed(task.completions)))


# -- concurrency (PostgreSQL, real threads) -------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_raters_leasing_at_once_never_share_a_slot_and_overlap_holds():
    """12 raters lease and submit from 12 threads at once until no work is left; every task
    ends with exactly ``overlap`` rankings by distinct raters."""
    campaign, _tasks = make_ranking_campaign(prompts=5, k=4, overlap=3)
    raters = [rater_of(campaign) for _ in range(12)]
    barrier = threading.Barrier(len(raters))
    leased: list[list[int]] = [[] for _ in raters]

    def work(i: int) -> int:
        rater = raters[i]
        try:
            barrier.wait(timeout=30)
            done = 0
            while True:
                slot = ranking_lease_next(rater=rater, campaign=campaign)
                if slot is None:
                    return done
                leased[i].append(slot.pk)
                order = random.Random(i).sample(slot.task.completions, 4)
                ranking_submit(rater=rater, campaign=campaign, slot_id=slot.pk, order=order)
                done += 1
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=len(raters)) as pool:
        done = list(pool.map(work, range(len(raters))))

    assert sum(done) == 15
    every = [pk for mine in leased for pk in mine]
    assert len(every) == len(set(every)) == 15, "a slot went to two raters"
    per_task = Counter(Ranking.objects.values_list("task_id", flat=True))
    assert sorted(per_task.values()) == [3] * 5
    assert not RankingSlot.objects.exclude(status=SlotStatus.FILLED).exists()
    pairs = Counter(Ranking.objects.values_list("task_id", "rater_id"))
    assert max(pairs.values()) == 1


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_one_rater_leasing_from_many_threads_holds_one_lease():
    campaign, _tasks = make_ranking_campaign(prompts=6, k=3, overlap=2)
    rater = rater_of(campaign)
    barrier = threading.Barrier(8)

    def work(_i: int) -> int:
        try:
            barrier.wait(timeout=30)
            return ranking_lease_next(rater=rater, campaign=campaign).pk
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = set(pool.map(work, range(8)))
    assert len(ids) == 1
    assert RankingSlot.objects.filter(rater=rater, status=SlotStatus.LEASED).count() == 1


# -- API ------------------------------------------------------------------------------------------


def api_client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.django_db
def test_api_lease_submit_in_positions_and_replay():
    campaign, (task,) = make_ranking_campaign(prompts=1, k=4)
    rater = rater_of(campaign)
    client = api_client(rater)
    next_url = reverse("annotation:api-rank-next", kwargs={"slug": campaign.slug})
    submit_url = reverse("annotation:api-rankings", kwargs={"slug": campaign.slug})

    card = client.post(next_url)
    assert card.status_code == 200
    body = card.json()
    assert [o["position"] for o in body["outputs"]] == [1, 2, 3, 4]
    slot = RankingSlot.objects.get(pk=body["slot"])
    texts = dict(task.prompt.completions.values_list("pk", "text"))
    assert [o["text"] for o in body["outputs"]] == [texts[c] for c in slot.shown_order]
    assert set(body) == {"slot", "lease_expires_at", "guidelines_version", "messages", "outputs"}
    assert "source" not in json.dumps(body)
    assert "model-" not in json.dumps(body)

    answer = {"slot": body["slot"], "order": [3, 1, 4, 2], "decision_ms": 1234}
    created = client.post(
        submit_url, answer, content_type="application/json", HTTP_IDEMPOTENCY_KEY="abc-123"
    )
    assert created.status_code == 201, created.content
    assert created.json()["order"] == [3, 1, 4, 2]
    ranking = Ranking.objects.get()
    shown = slot.shown_order
    assert ranking.order == [shown[2], shown[0], shown[3], shown[1]]
    assert ranking.decision_ms == 1234

    replay = client.post(
        submit_url, answer, content_type="application/json", HTTP_IDEMPOTENCY_KEY="abc-123"
    )
    assert replay.status_code == 200
    assert replay.json()["id"] == ranking.pk
    assert client.post(next_url).status_code == 204


@pytest.mark.django_db
def test_api_refuses_an_incomplete_ranking_and_a_slot_not_yours():
    campaign, _tasks = make_ranking_campaign(prompts=1, k=4)
    rater, other = rater_of(campaign), rater_of(campaign)
    client = api_client(rater)
    url = reverse("annotation:api-rankings", kwargs={"slug": campaign.slug})
    slot = client.post(reverse("annotation:api-rank-next", kwargs={"slug": campaign.slug})).json()
    short = client.post(
        url, {"slot": slot["slot"], "order": [1, 2, 3, 3]}, content_type="application/json"
    )
    assert short.status_code == 400
    assert short.json()["field"] == "order"
    lost = api_client(other).post(
        url, {"slot": slot["slot"], "order": [1, 2, 3, 4]}, content_type="application/json"
    )
    assert lost.status_code == 409
    assert Ranking.objects.count() == 0


@pytest.mark.django_db
def test_api_build_is_for_admins():
    campaign = CampaignFactory()
    prompt = PromptFactory(campaign=campaign)
    for _ in range(5):
        CompletionFactory(prompt=prompt)
    admin, rater = UserFactory(), rater_of(campaign)
    MembershipFactory(campaign=campaign, user=admin, role=Role.ADMIN)
    url = reverse("annotation:api-ranking-tasks-build", kwargs={"slug": campaign.slug})
    assert api_client(rater).post(url, {"k": 4}, content_type="application/json").status_code == 403
    response = api_client(admin).post(url, {"k": 4, "seed": 3}, content_type="application/json")
    assert response.status_code == 201
    assert response.json() == {"created": 1}
    bad = api_client(admin).post(url, {"k": 10}, content_type="application/json")
    assert bad.status_code == 400


# -- export ---------------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("where", ["page", "api"])
def test_export_expands_each_ranking_into_grouped_pairs(where):
    campaign, tasks = make_ranking_campaign(prompts=2, k=4)
    ml = UserFactory()
    MembershipFactory(campaign=campaign, user=ml, role=Role.ML_STAFF)
    rankings = []
    for _task in tasks:
        rater = rater_of(campaign)
        slot = ranking_lease_next(rater=rater, campaign=campaign)
        order = list(reversed(slot.task.completions))
        rankings.append(
            ranking_submit(rater=rater, campaign=campaign, slot_id=slot.pk, order=order).ranking
        )
    name = "annotation:campaign_export" if where == "page" else "annotation:api-export"
    response = api_client(ml).get(
        reverse(name, kwargs={"slug": campaign.slug}), {"format": "rankings"}
    )
    assert response.status_code == 200
    lines = [json.loads(line) for line in b"".join(response.streaming_content).splitlines()]
    assert len(lines) == 12  # two rankings of 4: 6 pairs each
    by_group = Counter(line["group"] for line in lines)
    assert by_group == {str(r.pk): 6 for r in rankings}
    ranking = rankings[0]
    texts = dict(ranking.task.prompt.completions.values_list("pk", "text"))
    mine = [line for line in lines if line["group"] == str(ranking.pk)]
    for line in mine:
        assert line["rank_chosen"] < line["rank_rejected"]
        assert line["chosen"] == [
            {"role": "assistant", "content": texts[ranking.order[line["rank_chosen"] - 1]]}
        ]
        assert line["rejected"][0]["content"] == texts[ranking.order[line["rank_rejected"] - 1]]
        assert line["prompt"] == ranking.task.prompt.messages
        assert line["weight"] == round(1 / 6, 6)  # the ranking's 6 pairs weigh one comparison
    assert {(line["rank_chosen"], line["rank_rejected"]) for line in mine} == {
        (1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)
    }  # fmt: skip


@pytest.mark.django_db
def test_export_of_rankings_reads_in_chunks_with_flat_query_count(django_assert_num_queries):
    from annotation.selectors_rankings import rankings_for_export

    campaign, tasks = make_ranking_campaign(prompts=5, k=3)
    for _task in tasks:
        rater = rater_of(campaign)
        slot = ranking_lease_next(rater=rater, campaign=campaign)
        ranking_submit(rater=rater, campaign=campaign, slot_id=slot.pk, order=slot.shown_order)
    # The cutoff, then per chunk of 2: rankings and their texts (3 chunks), and the empty end.
    with django_assert_num_queries(1 + 3 * 2 + 1):
        items = list(rankings_for_export(campaign=campaign, chunk_size=2))
    assert len(items) == 5
    lines = [record for ranking, texts in items for record in ranking_records(ranking, texts)]
    assert len(lines) == 15


# -- the page -------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_page_shows_outputs_by_position_and_submits_with_htmx():
    campaign, (_first, _second) = make_ranking_campaign(prompts=2, k=3)
    rater = rater_of(campaign)
    client = api_client(rater)
    url = reverse("annotation:rank", kwargs={"slug": campaign.slug})
    page = client.get(url)
    assert page.status_code == 200
    html = page.content.decode()
    slot = RankingSlot.objects.get(rater=rater, status=SlotStatus.LEASED)
    assert html.count("data-output ") == 3
    for source_name in slot.task.prompt.completions.values_list("source__name", flat=True):
        assert source_name not in html
    token = re.search(r'name="lease" value="(\d+)"', html).group(1)
    key = re.search(r'name="idempotency_key" value="([^"]+)"', html).group(1)
    form = {
        "slot_id": slot.pk,
        "lease": token,
        "idempotency_key": key,
        "decision_ms": "900",
        "order": "2,3,1",
    }
    submit_url = reverse("annotation:rank_submit", kwargs={"slug": campaign.slug})
    response = client.post(submit_url, form, headers=HTMX)
    assert response.status_code == 200
    body = response.content.decode()
    assert "Saved." in body
    assert "<html" not in body
    ranking = Ranking.objects.get()
    shown = slot.shown_order
    assert ranking.order == [shown[1], shown[2], shown[0]]
    # The next task swapped in; an incomplete ranking is refused in place (422, field named).
    nxt = RankingSlot.objects.get(rater=rater, status=SlotStatus.LEASED)
    assert f'data-card="{nxt.pk}"' in body
    token = re.search(r'name="lease" value="(\d+)"', body).group(1)
    bad = client.post(submit_url, {"slot_id": nxt.pk, "lease": token, "order": "1,2"}, headers=HTMX)
    assert bad.status_code == 422
    assert 'data-field="order"' in bad.content.decode()
    # A stale lease token: lost, not mapped with the wrong order.
    stale = client.post(
        submit_url, {"slot_id": nxt.pk, "lease": "1", "order": "1,2,3"}, headers=HTMX
    )
    assert stale.status_code == 409
    assert 'data-state="lease-lost"' in stale.content.decode()
    assert Ranking.objects.count() == 1


@pytest.mark.django_db
def test_page_messages_for_empty_queue_and_paused_campaign():
    campaign, _tasks = make_ranking_campaign(prompts=0, k=3)
    rater = rater_of(campaign)
    client = api_client(rater)
    url = reverse("annotation:rank", kwargs={"slug": campaign.slug})
    assert "Nothing left to rank" in client.get(url).content.decode()
    campaign.status = CampaignStatus.PAUSED
    campaign.save()
    paused = client.get(url, headers=HTMX)
    assert paused.status_code == 409
    assert 'data-state="paused"' in paused.content.decode()


@pytest.mark.django_db
def test_page_renders_hostile_outputs_inert():
    campaign = CampaignFactory(guidelines="<script>alert('g')</script>")
    prompt = PromptFactory(
        campaign=campaign,
        messages=[{"role": "user", "content": "<img src=x onerror=alert('p')>"}],
    )
    texts = [
        "<script>alert('xss-rank')</script>",
        "[link](javascript:alert('xss-link'))",
        '<div hx-get="/accounts/logout/" hx-trigger="load">htmx</div>',
    ]
    ids = [CompletionFactory(prompt=prompt, text=t).pk for t in texts]
    ranking_tasks_create(campaign=campaign, prompt_id=prompt.pk, completion_ids=ids)
    rater = rater_of(campaign)
    response = api_client(rater).get(reverse("annotation:rank", kwargs={"slug": campaign.slug}))
    html = response.content.decode()
    page = audit(html)
    assert page.problems == []
    assert sorted(s.get("src") for s in page.scripts) == [
        "/static/js/card-feedback.js",
        "/static/js/rank.js",
        "/static/vendor/htmx/htmx.min.js",
    ]
    text = "".join(page.text)
    assert "alert('xss-rank')" in text  # shown as text
    assert "<script>alert" not in html
    assert page.untrusted_blocks >= 1 + 1 + len(texts)  # guidelines, prompt, outputs


@pytest.mark.django_db
def test_admins_build_ranking_tasks_from_the_build_page_and_raters_see_a_rank_link():
    from django.test import Client

    from annotation.models import RankingTask
    from tests.factories import MembershipFactory, UserFactory

    campaign, _tasks = make_ranking_campaign(prompts=3, k=3)
    RankingTask.objects.filter(campaign=campaign).delete()
    admin, rater = UserFactory(), UserFactory()
    MembershipFactory(campaign=campaign, user=admin, role="admin")
    MembershipFactory(campaign=campaign, user=rater, role="rater")
    browser = Client()
    browser.force_login(rater)
    assert b"/rank/" not in browser.get("/").content
    browser.force_login(admin)
    build_page = browser.get(f"/campaigns/{campaign.slug}/build/")
    assert b"Build ranking tasks" in build_page.content
    response = browser.post(f"/campaigns/{campaign.slug}/build/rankings/", {"k": 3}, follow=True)
    assert b"Built 3 new ranking tasks." in response.content
    assert RankingTask.objects.filter(campaign=campaign).count() == 3
    refused = browser.post(f"/campaigns/{campaign.slug}/build/rankings/", {"k": 12}, follow=True)
    assert b"less than or equal to 9" in refused.content
    browser.force_login(rater)
    assert f"/rate/{campaign.slug}/rank/".encode() in browser.get("/").content
