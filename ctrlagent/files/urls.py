"""
Pure validation of mod download URLs, before anything resolves or fetches them.

A URL reaches the agent from the Panel (``install_mod``'s ``downloadUrl``)
and from remote servers (``Location`` of a redirect).  Everything the HTTP
stack, IDNA codec or resolver would choke on later (with an exception that
is not a protocol error) is refused here as ``InvalidInput`` naming the
field, with a message saying what is wrong.  Accepted:

- ``http`` or ``https`` with an authority (``//host``), ASCII only (other
  characters must be percent-encoded), no whitespace or control characters,
  at most ``MAX_URL_CHARS`` characters;
- no credentials (``user:pass@``);
- a host that is a DNS name (labels of letters, digits, ``-`` and ``_``,
  1-63 characters, not starting or ending with ``-``, 253 characters in
  all), a dotted-quad IPv4 address, or a bracketed IPv6 address without a
  zone.  A name whose last label is numeric is an address in the resolver's
  eyes (``0x7f.1``, ``127.1``): only the canonical dotted quad is accepted;
- a port, if any, of 1 to 65535.

This is about well-formedness only: which addresses may be reached is the
``fetch`` module's ``AddressPolicy``, applied to every resolved address.
"""

from __future__ import annotations

import ipaddress
import re

from ctrlagent.errors import InvalidInput

MAX_URL_CHARS = 2048
MAX_HOST_CHARS = 253

_SCHEME_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)", re.DOTALL)
_LABEL_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_NUMERIC_LABEL_RE = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")
_PORT_RE = re.compile(r"[0-9]{1,5}")


def check_url(url: object, field: str = "downloadUrl") -> str:
    """Return ``url`` if it is a well-formed http(s) URL (see the module), else raise."""
    if not isinstance(url, str):
        raise _bad(field, "must be a string")
    if len(url) > MAX_URL_CHARS:
        raise _bad(field, "is longer than {} characters".format(MAX_URL_CHARS))
    if not url.isascii():
        raise _bad(field, "must be ASCII (percent-encode other characters)")
    if any(ch <= " " or ch == "\x7f" for ch in url):
        raise _bad(field, "contains whitespace or control characters")
    m = _SCHEME_RE.fullmatch(url)
    if m is None or m.group("scheme").lower() not in ("http", "https"):
        raise _bad(field, "must be an http:// or https:// URL")
    rest = m.group("rest")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in authority:
        raise _bad(field, "must not carry credentials")
    host, port = _split_authority(authority, field)
    _check_host(host, field)
    if port is not None:
        if not _PORT_RE.fullmatch(port) or not 1 <= int(port) <= 65535:
            raise _bad(field, "has an invalid port (1-65535)")
    return url


def _bad(field: str, why: str) -> InvalidInput:
    return InvalidInput("{} {}".format(field, why), field=field)


def _split_authority(authority: str, field: str) -> tuple[str, str | None]:
    """``(host, port or None)``; an IPv6 host keeps its brackets."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise _bad(field, "has an unbalanced '[' in its host")
        host, after = authority[:end + 1], authority[end + 1:]
        if not after:
            return host, None
        if not after.startswith(":"):
            raise _bad(field, "has characters after its IPv6 address")
        return host, after[1:]
    if "[" in authority or "]" in authority:
        raise _bad(field, "has a bracket in its host")
    host, colon, port = authority.partition(":")
    return host, port if colon else None


def _check_host(host: str, field: str) -> None:
    if not host:
        raise _bad(field, "has no host")
    if host.startswith("["):
        inner = host[1:-1]
        if "%" in inner:
            raise _bad(field, "has an IPv6 zone, which is not allowed")
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise _bad(field, "has an invalid IPv6 address") from None
        return
    name = host[:-1] if host.endswith(".") else host
    if len(name) > MAX_HOST_CHARS:
        raise _bad(field, "has a host longer than {} characters".format(MAX_HOST_CHARS))
    labels = name.split(".")
    for label in labels:
        if not _LABEL_RE.fullmatch(label):
            raise _bad(field, "has an invalid host name label {!r}".format(label[:70]))
    if _NUMERIC_LABEL_RE.fullmatch(labels[-1]):
        # The resolver would read this as an address, in its many forms.
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            raise _bad(field, "has an invalid IPv4 address") from None
