"""email_to_text: headers out, Subject and readable body in."""

from splice.data.email_text import email_to_text, html_to_text, tidy_whitespace


def test_plain_parts_preferred_over_html_and_headers_dropped():
    raw = (
        "Received: from a by b\nX-Spam-Flag: YES\nSubject: Hello\n"
        'Content-Type: multipart/alternative; boundary="B"\n\n'
        "--B\nContent-Type: text/plain\n\nplain body\n"
        "--B\nContent-Type: text/html\n\n<p>html body</p>\n--B--\n"
    )
    assert email_to_text(raw) == "Hello\n\nplain body"


def test_no_subject_and_8bit_text_kept_as_is():
    raw = "From: a@b\nContent-Type: text/plain; charset=utf-8\n\nnaïve café\n"
    assert email_to_text(raw) == "naïve café"


def test_unknown_charset_falls_back_to_latin1():
    raw = (
        "Subject: s\nContent-Type: text/plain; charset=x-unknown\n"
        "Content-Transfer-Encoding: quoted-printable\n\ncaf=E9\n"
    )
    assert email_to_text(raw) == "s\n\ncafé"


def test_html_to_text_and_tidy():
    html = "<td>a</td><td>b</td><!-- c --><style>x</style>d&lt;e"
    assert tidy_whitespace(html_to_text(html)) == "a b d<e"
    assert tidy_whitespace("  a \t b \r\n\n\n\n c\xa0 d  ") == "a b\n\nc d"
