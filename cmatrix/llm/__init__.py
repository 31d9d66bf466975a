"""Tensor-parallel Llama-family decoding across the cluster.

    import cmatrix as cm
    cl = cm.init()
    model = cm.llm.load(cl, "path/to/hf-model")
    print(model.generate("Hello", max_new_tokens=32).text)
"""

from .config import DecoderConfig
from .model import DecoderModel, load

__all__ = ["DecoderConfig", "DecoderModel", "load"]
