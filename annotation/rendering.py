"""Safe markdown: the one place where untrusted text (prompts, model outputs, critiques,
guidelines) becomes markup.

Two independent layers, so a bug in either one alone does not open a hole:

1. markdown-it-py with raw HTML off: ``<script>`` in the source comes out as the text
   ``&lt;script&gt;``; its link validator already refuses ``javascript:``, ``vbscript:``,
   ``file:`` and ``data:`` URLs. Images are off: a remote image would make every rater's
   browser fetch an attacker-chosen URL (and CSP would block it anyway).
2. nh3 (ammonia) re-parses the result and keeps only an allowlist of tags and attributes:
   no ``on*`` handlers, no ``style`` (CSP forbids inline styles), no ``id``/``name`` (DOM
   clobbering), no ``hx-*`` / ``data-hx-*`` (htmx would act on them), and links only to
   absolute http(s) or mailto URLs, opened with ``rel="noopener noreferrer nofollow"``.

Templates call it through the ``render_markdown`` filter, and render the result inside an
``hx-disable`` element as a third line of defence against htmx attributes.
"""

from __future__ import annotations

import re

import nh3
from django.utils.safestring import SafeString, mark_safe
from markdown_it import MarkdownIt

_markdown = (
    MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    .enable(["table", "strikethrough"])
    .disable("image")
)

ALLOWED_TAGS = frozenset(
    {
        "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6",
        "strong", "em", "b", "i", "del", "s", "code", "pre", "blockquote",
        "ul", "ol", "li", "a", "table", "thead", "tbody", "tr", "th", "td",
    }
)  # fmt: skip
ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "ol": {"start"}, "code": {"class"}}
URL_SCHEMES = frozenset({"http", "https", "mailto"})
LINK_REL = "noopener noreferrer nofollow"

_LANGUAGE_CLASS = re.compile(r"language-[A-Za-z0-9_+#.-]{1,40}")
_SAFE_HREF = re.compile(r"(?:https?://|mailto:)", re.IGNORECASE)


def _attribute_filter(tag: str, attribute: str, value: str) -> str | None:
    # nh3 already enforces the scheme list; checking again here keeps the rule in one readable
    # place and also drops protocol-relative ``//host`` links, which are not ours to follow.
    if tag == "a" and attribute == "href":
        return value if _SAFE_HREF.match(value) else None
    # Fenced code blocks carry ``language-xyz`` for highlighting; nothing else may set classes
    # (a class could restyle the page or match our own selectors, e.g. ``.actions``).
    if tag == "code" and attribute == "class":
        return value if _LANGUAGE_CLASS.fullmatch(value) else None
    return value


def sanitize_html(html: str) -> str:
    """Keep only the allowlisted tags and attributes of ``html``; returns a plain str."""
    return nh3.clean(
        html,
        tags=set(ALLOWED_TAGS),
        clean_content_tags={"script", "style"},
        attributes={tag: set(attrs) for tag, attrs in ALLOWED_ATTRIBUTES.items()},
        attribute_filter=_attribute_filter,
        url_schemes=set(URL_SCHEMES),
        url_relative="deny",
        link_rel=LINK_REL,
        strip_comments=True,
    )


def render_markdown(text: str) -> SafeString:
    """Render untrusted markdown to HTML that is safe to insert into a page."""
    if not text:
        return mark_safe("")  # the empty string holds no markup
    cleaned = sanitize_html(_markdown.render(text))
    # Safe because ``cleaned`` is nh3's output: every tag and attribute in it is on the
    # allowlist above, and nh3 escapes all text. This is the only mark_safe in the project
    # on derived text (tests/annotation/test_xss.py fails on any other).
    return mark_safe(cleaned)
