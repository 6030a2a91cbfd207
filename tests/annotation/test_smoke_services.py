from annotation.models import Judgment, SlotStatus
from annotation.services.judgments import judgment_submit, slot_lease_next
from tests.conftest import make_campaign
from tests.factories import UserFactory


def test_lease_then_submit_fills_the_slot(db):
    campaign = make_campaign(comparisons=1)
    rater = UserFactory()
    slot = slot_lease_next(rater=rater, campaign=campaign)
    assert slot is not None
    result = judgment_submit(
        rater=rater, campaign=campaign, slot_id=slot.pk, choice="a", strength=2
    )
    assert result.created
    slot.refresh_from_db()
    assert slot.status == SlotStatus.FILLED
    assert Judgment.objects.count() == 1
    assert slot_lease_next(rater=rater, campaign=campaign) is None
