"""The request path of the Triton models as plain Python (only ``backend`` imports ``triton_python_backend_utils``).

``contract`` (the tensor table), ``render`` (config.pbtxt text from it), ``tensors`` (small array helpers),
``params`` (model parameters -> EngineConfig), ``preprocess`` / ``postprocess`` (tokenise, detokenise),
``request`` (llm inputs -> Sequence + SamplingParams), ``response`` (engine outputs -> llm output tensors),
``host`` (an engine serving Triton requests: cancellation, n samples, the sender thread).
Each ``model_repository*/*/1/model.py`` is a short adapter over these; ``backend`` is the part of them that speaks
``pb_utils`` (read a request's inputs, answer it), imported only inside Triton's Python stub.
"""
