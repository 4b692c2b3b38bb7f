"""The ONNX side of a plan: the loaded model and its conv inventory, its input data, its calibration and QDQ models.

Nothing here imports TVM: the QDQ model built here is what :mod:`precsearch.tvm`
compiles and what ONNX Runtime runs as the cross-check.
"""

from ._load import (CONV_OP_TYPES, MIN_OPSET, PACKAGED_MODELS, ConvLayer, LoadedModel, describe_ids, load_model,
                    open_model, parse_input_shapes, resolve_model)

__all__ = ["CONV_OP_TYPES", "MIN_OPSET", "PACKAGED_MODELS", "ConvLayer", "LoadedModel", "describe_ids", "load_model",
           "open_model", "parse_input_shapes", "resolve_model"]
