"""`GET /`: the review page, one self-contained HTML page under a strict Content-Security-Policy.

The page's files ship in the package (`serving/page/`: index.html, page.css, page.js) and
nothing is loaded from elsewhere: no CDN, no font, no other route. The style sheet and the
script are inlined into the HTML once, and the policy admits exactly those two by their
sha256, so no other script or style can run, inline or injected. Trusted Types are required,
so an HTML sink (innerHTML and the like) throws in the browser: every string from a file or
an answer is shown as text. Images may come only from the page itself, `data:` and `blob:`
(the film the reviewer chose and the heat map /explain returns); the page talks only to its
own origin. The page is static and carries no data, so it is the one route besides /healthz
that needs no token; the routes it calls ask for the token as usual (the page keeps it in memory).
"""

from __future__ import annotations

import base64
import hashlib
from functools import cache
from importlib.resources import files

from fastapi.responses import HTMLResponse

STYLE_TAG = '<link rel="stylesheet" href="page.css">'
SCRIPT_TAG = '<script src="page.js"></script>'  # at the end of the body: inlined, it runs once the page is parsed


def _asset(name: str) -> str:
    return (files("xray_ray.serving") / "page" / name).read_text(encoding="utf-8")


def _sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def _inline(html: str, tag: str, element: str, body: str) -> str:
    """`html` with `tag` replaced by `<element>body</element>` (the tag must be there, exactly once)."""
    if html.count(tag) != 1 or f"</{element}" in body.lower():
        raise ValueError(f"the review page cannot inline its {element}: {tag!r} must appear once in index.html, "
                         f"and the {element} must not close its own element")
    return html.replace(tag, f"<{element}>{body}</{element}>")


@cache
def page() -> tuple[bytes, dict[str, str]]:
    """The page's bytes and its response headers (built once per process)."""
    css, script = _asset("page.css"), _asset("page.js")
    html = _inline(_inline(_asset("index.html"), STYLE_TAG, "style", css), SCRIPT_TAG, "script", script)
    policy = "; ".join([
        "default-src 'none'",
        f"script-src {_sha256_source(script)}",
        f"style-src {_sha256_source(css)}",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
        "trusted-types 'none'",
    ])
    headers = {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
    return html.encode("utf-8"), headers


def review_page() -> HTMLResponse:
    """The response to `GET /`."""
    body, headers = page()
    return HTMLResponse(body, headers=headers)
