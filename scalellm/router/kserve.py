"""KServe v2 ``infer`` bodies on the router: a JSON header, optionally followed by binary tensor data.

Triton's binary tensor extension puts the JSON first and says how long it is in the
``Inference-Header-Content-Length`` header; each input with ``parameters.binary_data_size`` has its bytes,
in input order, after it (a BYTES element is a 4-byte little-endian length and the UTF-8 bytes). The router
reads only what the policy needs (the prompt and ``max_tokens``) and replaces the request ``id``.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

HEADER_LENGTH = "Inference-Header-Content-Length"


class BadInferBody(ValueError):
    """The body is not a KServe v2 inference request (HTTP 400)."""


@dataclass
class InferBody:
    header: dict[str, Any]
    binary: bytes = b""
    binary_header: bool = False  # the client used the binary extension: answer with its header length too
    offsets: dict[str, tuple[int, int]] = field(default_factory=dict)  # input name -> its bytes in ``binary``

    @classmethod
    def parse(cls, body: bytes, header_length: str | None, content_encoding: str | None) -> InferBody:
        if content_encoding in ("gzip", "deflate"):
            try:
                body = gzip.decompress(body) if content_encoding == "gzip" else zlib.decompress(body)
            except (OSError, zlib.error) as exc:
                raise BadInferBody(f"the body is not valid {content_encoding}: {exc}") from None
        elif content_encoding not in (None, "", "identity"):
            raise BadInferBody(f"unsupported Content-Encoding {content_encoding!r} (gzip, deflate)")
        try:
            size = len(body) if header_length is None else int(header_length)
        except ValueError:
            raise BadInferBody(f"{HEADER_LENGTH} must be an integer (got {header_length!r})") from None
        if not 0 <= size <= len(body):
            raise BadInferBody(f"{HEADER_LENGTH} {size} is outside the body's {len(body)} bytes")
        try:
            header = json.loads(body[:size])
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadInferBody(f"the inference request header is not JSON: {exc}") from None
        if not isinstance(header, dict) or not isinstance(header.get("inputs", []), list):
            raise BadInferBody("the inference request must be a JSON object with a list of inputs")
        parsed = cls(header, body[size:], header_length is not None)
        start = 0
        for tensor in header.get("inputs", []):
            length = (tensor.get("parameters") or {}).get("binary_data_size") if isinstance(tensor, dict) else None
            if isinstance(length, int):
                parsed.offsets[str(tensor.get("name"))] = (start, start + length)
                start += length
        return parsed

    def _input(self, name: str) -> dict[str, Any] | None:
        for tensor in self.header.get("inputs", []):
            if isinstance(tensor, dict) and tensor.get("name") == name:
                return tensor
        return None

    def first_value(self, name: str) -> Any:
        """The first element of input ``name`` (BYTES as str), or None."""
        tensor = self._input(name)
        if tensor is None:
            return None
        if name in self.offsets:
            start, end = self.offsets[name]
            raw = self.binary[start:end]
            if tensor.get("datatype") == "BYTES":
                size = int.from_bytes(raw[:4], "little")
                return raw[4:4 + size].decode("utf-8", errors="replace") if len(raw) >= 4 else None
            if tensor.get("datatype") == "INT32" and len(raw) >= 4:
                return int.from_bytes(raw[:4], "little", signed=True)
            return None
        data = tensor.get("data")
        while isinstance(data, list) and data:
            data = data[0]
        return data

    def with_id(self, request_id: str) -> tuple[bytes, dict[str, str]]:
        """The body to forward with ``id`` = ``request_id``, and its content headers."""
        return encode({**self.header, "id": request_id}, self.binary, self.binary_header)


def encode(header: dict[str, Any], binary: bytes, binary_header: bool) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header, separators=(",", ":")).encode()
    if not binary_header and not binary:
        return head, {"Content-Type": "application/json"}
    return head + binary, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


def answer_with_id(body: bytes, header_length: str | None, client_id: str | None) -> tuple[bytes, dict[str, str]]:
    """A replica's infer response with the client's ``id`` put back (none if the client gave none)."""
    size = len(body) if header_length is None else int(header_length)
    header = json.loads(body[:size])
    header.pop("id", None)
    if client_id is not None:
        header = {"id": client_id, **header}
    return encode(header, body[size:], header_length is not None)
