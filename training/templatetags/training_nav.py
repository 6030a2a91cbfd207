"""``{% trains_somewhere as flag %}``: whether the top bar offers the training pages.

One indexed EXISTS per full page (the rater's HTMX card swaps do not render the top bar), and
none for anonymous visitors or superusers, who hold every role."""

from __future__ import annotations

from typing import Any

from django import template

from annotation.models import Membership
from training.access import VIEWERS

register = template.Library()


@register.simple_tag(takes_context=True)
def trains_somewhere(context: dict[str, Any]) -> bool:
    user = context.get("user")
    if user is None or not user.is_authenticated:
        return False
    if user.is_superuser:
        return True
    return Membership.objects.filter(user_id=user.pk, role__in=VIEWERS).exists()
