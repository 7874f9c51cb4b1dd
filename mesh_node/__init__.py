"""mesh-node: a peer-to-peer mesh that pools machines for LLM inference."""

__version__ = "0.1.0"
