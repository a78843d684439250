"""KServe v2 infer bodies as tritonclient writes them (JSON and the binary tensor extension), read by the router."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import tritonclient.http as httpclient

from scalellm.router.kserve import BadInferBody, InferBody, answer_with_id

PROMPT = "What is the capital of France? ✓"


def request_body(binary: bool, request_id: str = "") -> tuple[bytes, str | None]:
    text = httpclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[PROMPT.encode()]], dtype=object), binary_data=binary)
    tokens = httpclient.InferInput("max_tokens", [1, 1], "INT32")
    tokens.set_data_from_numpy(np.array([[24]], dtype=np.int32), binary_data=binary)
    body, json_size = httpclient.InferenceServerClient.generate_request_body([text, tokens], request_id=request_id)
    return body, None if json_size is None else str(json_size)


@pytest.mark.parametrize("binary", [False, True])
def test_the_router_reads_the_prompt_and_replaces_the_id(binary: bool) -> None:
    body, header_length = request_body(binary, request_id="client-7")
    parsed = InferBody.parse(body, header_length, None)
    assert (parsed.first_value("text_input"), parsed.first_value("max_tokens")) == (PROMPT, 24)
    assert parsed.first_value("stop_words") is None
    forwarded, headers = parsed.with_id("router-1")
    again = InferBody.parse(forwarded, headers.get("Inference-Header-Content-Length"), None)
    assert again.header["id"] == "router-1" and again.first_value("text_input") == PROMPT
    assert again.binary == parsed.binary


def test_a_compressed_body_is_read() -> None:
    body, header_length = request_body(True)
    assert InferBody.parse(gzip.compress(body), header_length, "gzip").first_value("text_input") == PROMPT


@pytest.mark.parametrize(("body", "header_length", "encoding", "message"), [
    (b"not json", None, None, "not JSON"),
    (b"[]", None, None, "JSON object"),
    (b"{}", "99", None, "outside the body"),
    (b"{}", "x", None, "must be an integer"),
    (b"{}", None, "br", "unsupported Content-Encoding"),
    (b"{}", None, "gzip", "not valid gzip"),
])
def test_bad_bodies_are_named(body: bytes, header_length: str | None, encoding: str | None, message: str) -> None:
    with pytest.raises(BadInferBody, match=message):
        InferBody.parse(body, header_length, encoding)


def test_the_answer_gets_the_clients_id_back() -> None:
    output = np.array([b"Paris"], dtype=object)
    header = b'{"id":"router-1","model_name":"ensemble","outputs":[{"name":"text_output","datatype":"BYTES",' \
             b'"shape":[1],"parameters":{"binary_data_size":9}}]}'
    body = header + len(output[0]).to_bytes(4, "little") + output[0]
    for client_id, length in (("client-7", str(len(header))), (None, str(len(header)))):
        answer, headers = answer_with_id(body, length, client_id)
        result = httpclient.InferenceServerClient.parse_response_body(
            answer, header_length=int(headers["Inference-Header-Content-Length"]))
        assert result.get_response().get("id") == client_id
        assert result.as_numpy("text_output")[0] == b"Paris"
