"""Request-body helpers: base64 decoded a piece at a time gives the same bytes and errors."""

from __future__ import annotations

import base64
import os

import pytest

from serve import body
from serve.errors import ApiError
from serve.settings import Settings

SETTINGS = Settings(artifact_dir="/nonexistent", index_dir="/nonexistent", max_upload_bytes=4096)


@pytest.mark.parametrize("size", [0, 1, 2, 3, 29, 30, 31, 100, 3000])
@pytest.mark.parametrize("line_chars", [None, 76, 5])
def test_piecewise_base64_matches_the_plain_decoder(
    monkeypatch: pytest.MonkeyPatch, size: int, line_chars: int | None
) -> None:
    monkeypatch.setattr(body, "BASE64_PIECE_CHARS", 16)  # many pieces, breaks across them
    data = os.urandom(size)
    text = base64.b64encode(data).decode()
    if line_chars:
        text = "\r\n".join(text[i : i + line_chars] for i in range(0, len(text), line_chars))
    assert body.decode_base64(text, "x", SETTINGS) == data
    assert body.decode_base64("data:image/png;base64," + text, "x", SETTINGS) == data


@pytest.mark.parametrize("text", ["AA==AAAA", "A", "AAAAA", "AA=A", "!!!!", "AAAA" * 5 + "A=="])
def test_malformed_base64_is_422(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr(body, "BASE64_PIECE_CHARS", 16)
    with pytest.raises(ApiError) as refused:
        body.decode_base64(text, "x", SETTINGS)
    assert refused.value.status == 422


def test_oversized_base64_is_refused_after_the_limit_not_the_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A body of 10x the limit is refused once the decoded bytes pass it: the rest is never
    decoded (a piece that is not base64 after the limit is not even looked at)."""
    monkeypatch.setattr(body, "BASE64_PIECE_CHARS", 1024)
    text = base64.b64encode(bytes(8192)).decode() + "!" * 40_000
    with pytest.raises(ApiError) as refused:
        body.decode_base64(text, "x", SETTINGS)
    assert refused.value.status == 413


def test_a_text_over_the_limit_by_its_length_is_refused_before_any_decoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its length alone (line breaks not counted) says it decodes to more than the limit."""
    decoded: list[int] = []
    decode_piece = body._b64decode
    monkeypatch.setattr(
        body,
        "_b64decode",
        lambda text, where: decoded.append(len(text)) or decode_piece(text, where),
    )
    over = base64.b64encode(bytes(SETTINGS.max_upload_bytes + 3)).decode()
    with pytest.raises(ApiError) as refused:
        body.decode_base64(over, "x", SETTINGS)
    assert refused.value.status == 413 and decoded == []
    at_limit = base64.b64encode(bytes(SETTINGS.max_upload_bytes)).decode()
    broken = "\r\n".join(at_limit[i : i + 4] for i in range(0, len(at_limit), 4))
    assert body.decode_base64(broken, "x", SETTINGS) == bytes(SETTINGS.max_upload_bytes)
