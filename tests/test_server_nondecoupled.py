"""The non-decoupled deployment (``build_engines.py --decoupled-mode false``) on its own real tritonserver.

KServe v2 ``infer`` (HTTP and gRPC ModelInfer) and HTTP ``generate`` answer; streaming and
``num_return_sequences`` > 1 are refused naming the field. The llm model is served as ``tensorrt_llm``
(``--llm-model-name``), the name tensorrtllm_backend's tools call it by.
"""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import RunningServer, http_json

from scalellm_client import Client, ScaleLLMError, chatml

pytestmark = pytest.mark.server
TIMEOUT_S = 180.0
QUESTION = "What is the capital of France?"


def test_kserve_infer_json_answers(plain_server: RunningServer) -> None:
    """What `curl -X POST .../v2/models/ensemble/infer -d '{"inputs": [...]}'` sends."""
    body = {"inputs": [
        {"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": [QUESTION]},
        {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [32]},
        {"name": "apply_chat_template", "shape": [1, 1], "datatype": "BOOL", "data": [True]},
        {"name": "exclude_input_in_output", "shape": [1, 1], "datatype": "BOOL", "data": [True]},
    ]}
    status, answer = http_json(f"{plain_server.http_url}/v2/models/ensemble/infer", body)
    assert status == 200, answer
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["text_output"]["shape"] == [1]
    assert "Paris" in outputs["text_output"]["data"][0]
    assert outputs["finish_reason"]["data"] == ["stop"]


def test_grpc_model_infer_on_ensemble_and_llm(plain_server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(plain_server.grpc_url)
    try:
        prompt = np.array([[chatml(QUESTION).encode()]], dtype=object)
        inputs = [grpcclient.InferInput("text_input", [1, 1], "BYTES"),
                  grpcclient.InferInput("max_tokens", [1, 1], "INT32")]
        inputs[0].set_data_from_numpy(prompt)
        inputs[1].set_data_from_numpy(np.array([[32]], dtype=np.int32))
        result = client.infer("ensemble", inputs)
        assert "Paris" in result.as_numpy("text_output")[0].decode("utf-8")
        ids = np.array([[504, 3575, 282, 4649, 314]], dtype=np.int32)  # "The capital of France is"
        llm_inputs = [grpcclient.InferInput("input_ids", [1, 5], "INT32"),
                      grpcclient.InferInput("request_output_len", [1, 1], "INT32")]
        llm_inputs[0].set_data_from_numpy(ids)
        llm_inputs[1].set_data_from_numpy(np.array([[6]], dtype=np.int32))
        result = client.infer("tensorrt_llm", llm_inputs)
        output_ids = result.as_numpy("output_ids")
        assert output_ids.shape[:2] == (1, 1) and list(output_ids[0][0][:5]) == ids[0].tolist()
        assert result.as_numpy("sequence_length")[0][0] == output_ids.shape[2]
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_scalellm_client_generates_and_stream_is_refused(plain_server: RunningServer, protocol: str) -> None:
    url = plain_server.grpc_url if protocol == "grpc" else plain_server.http_url
    with Client(url, protocol=protocol, timeout_s=TIMEOUT_S) as client:
        assert "Paris" in client.generate(chatml(QUESTION), max_tokens=32).text
        with pytest.raises(ScaleLLMError, match="stream"):
            list(client.stream(chatml(QUESTION), max_tokens=8))
    status, body = http_json(f"{plain_server.http_url}/v2/models/ensemble/generate",
                        {"text_input": "hi", "max_tokens": 4, "num_return_sequences": 2})
    assert status == 400 and "num_return_sequences" in body["error"], body
