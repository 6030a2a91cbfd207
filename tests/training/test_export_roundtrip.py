"""What the annotation app exports, the training library reads: every export format goes
through the real export view and back through ``training.core.data``."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.test import Client

from annotation.models import Judgment, Role
from tests.conftest import make_campaign
from tests.factories import MembershipFactory, UserFactory
from tests.training.helpers import judge
from training.core.data import read_preference_jsonl

pytestmark = pytest.mark.django_db


def _export(campaign, fmt: str, folder: Path) -> Path:
    admin = UserFactory()
    MembershipFactory(campaign=campaign, user=admin, role=Role.ADMIN)
    client = Client()
    client.force_login(admin)
    response = client.get(f"/campaigns/{campaign.slug}/export.jsonl?format={fmt}")
    assert response.status_code == 200
    path = folder / f"{fmt}.jsonl"
    path.write_bytes(b"".join(response.streaming_content))
    return path


@pytest.mark.parametrize("fmt", ["trl", "text", "full"])
def test_every_export_format_reads_back_as_preference_pairs(tmp_path, fmt):
    campaign = make_campaign(comparisons=6, overlap=1)
    judge(campaign, raters=2, choices=["a", "b", "tie"])  # a, b and a tie
    judgments = list(Judgment.objects.filter(campaign=campaign).select_related("comparison"))
    pairs = read_preference_jsonl(_export(campaign, fmt, tmp_path))
    decisive = [j for j in judgments if j.choice in ("a", "b")]
    expected = len(judgments) if fmt == "full" else len(decisive)  # only full keeps ties
    assert len(pairs) == expected
    texts = {p.chosen for p in pairs} | {p.rejected for p in pairs}
    for judgment in decisive:
        comparison = judgment.comparison
        winner = comparison.completion_a if judgment.choice == "a" else comparison.completion_b
        assert winner.text in texts
    if fmt == "full":
        assert sorted(p.label for p in pairs).count(0.5) == len(judgments) - len(decisive)
