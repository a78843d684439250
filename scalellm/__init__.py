"""ScaleLLM on Triton: an in-flight-batched LLM engine served by Triton Inference Server.

The Triton Python backends (model_repository/*/1/model.py) import this package; ``scalellm.serving`` starts
the server. Importing the package itself stays cheap: no torch here.
"""

__version__ = "0.1.0"
