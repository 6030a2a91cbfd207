"""Template filters for annotation's pages."""

from __future__ import annotations

from django import template
from django.utils.safestring import SafeString

from annotation import rendering

register = template.Library()


@register.filter(name="render_markdown")
def render_markdown(text: object) -> SafeString:
    """Untrusted markdown -> sanitised HTML. ``str()`` first: even text that arrives marked
    safe is rendered from scratch, so nothing skips the sanitiser."""
    return rendering.render_markdown("" if text is None else str(text))
