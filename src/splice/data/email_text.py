"""Raw RFC-822 email -> the text a classifier should see: the Subject and the body.

Headers other than Subject are dropped: they carry routing data (Received, Message-Id,
mailing-list headers, spam-filter verdicts such as X-Spam-Status) that identify the
collection an email came from rather than what it says, and would leak the label.

The body, from a stdlib `email` parse (compat32 policy, which accepts the malformed
messages common in spam):
- every non-attachment ``text/plain`` part, transfer-decoded (base64, quoted-printable) and
  charset-decoded (an unknown or wrong charset falls back to latin-1), joined by blank
  lines; a part in 7bit/8bit is used as it is (the source already holds it as text);
- if there is none, every ``text/html`` part with its markup removed (script, style and
  comments dropped, block tags become line breaks, entities unescaped);
- if there is neither, the undecoded payload of a single-part message.
Whitespace is tidied: runs of spaces/tabs become one space, lines are stripped, more than
one blank line becomes one. The result is ``Subject + "\\n\\n" + body`` (or either alone).
"""

from __future__ import annotations

import email
import re
from email import policy
from email.header import decode_header, make_header
from email.message import Message
from html import unescape
from html.parser import HTMLParser

_BLOCK_TAGS = frozenset(
    [
        "br",
        "p",
        "div",
        "tr",
        "li",
        "ul",
        "ol",
        "table",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "hr",
        "blockquote",
        "pre",
        "title",
    ]
)
_SKIP_TAGS = frozenset({"script", "style", "head"})


class _HtmlText(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag(tag, 1)

    def handle_endtag(self, tag: str) -> None:
        self._tag(tag, -1)

    def _tag(self, tag: str, step: int) -> None:
        """Opening (+1) or closing (-1) tag: skipped blocks nest; blocks and cells break."""
        if tag in _SKIP_TAGS:
            self.skip = max(0, self.skip + step)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """Visible text of an HTML fragment (markup, scripts, styles and comments removed)."""
    parser = _HtmlText()
    try:
        parser.feed(html)
        parser.close()
    except Exception:  # a broken document: fall back to dropping anything tag-like
        return unescape(re.sub(r"<[^>]*>", " ", html))
    return "".join(parser.parts)


def tidy_whitespace(text: str) -> str:
    """One space for runs of spaces/tabs, stripped lines, at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [re.sub(r"[ \t\f\v\xa0]+", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _decode_part(part: Message) -> str:
    raw = part.get_payload()
    if not isinstance(raw, str):
        return ""
    cte = str(part.get("Content-Transfer-Encoding") or "").strip().lower()
    if cte not in ("base64", "quoted-printable") or not raw.isascii():
        # 7bit/8bit/binary (or a mislabeled part): the payload is already text; the
        # stdlib would re-encode its non-ASCII characters as escapes.
        return raw
    payload = part.get_payload(decode=True)
    if payload is None:
        return raw
    charset = part.get_content_charset() or "latin-1"
    try:
        return payload.decode(charset)
    except (LookupError, UnicodeDecodeError):
        return payload.decode("latin-1")


def _subject(msg: Message) -> str:
    raw = msg.get("Subject")
    if raw is None:
        return ""
    try:
        return str(make_header(decode_header(str(raw))))
    except Exception:  # undecodable encoded-words: keep the raw header
        return str(raw)


def email_to_text(raw: str) -> str:
    """Subject and body of a raw RFC-822 email, as described in the module docstring."""
    msg = email.message_from_string(raw, policy=policy.compat32)
    plain: list[str] = []
    html: list[str] = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        if (part.get("Content-Disposition") or "").strip().lower().startswith("attachment"):
            continue
        ctype = part.get_content_type()
        if ctype == "text/plain":
            plain.append(_decode_part(part))
        elif ctype == "text/html":
            html.append(html_to_text(_decode_part(part)))
    if plain:
        body = "\n\n".join(plain)
    elif html:
        body = "\n\n".join(html)
    else:
        payload = msg.get_payload()
        body = payload if isinstance(payload, str) else ""
    subject = tidy_whitespace(_subject(msg))
    body = tidy_whitespace(body)
    return "\n\n".join(x for x in (subject, body) if x)
