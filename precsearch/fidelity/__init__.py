"""How close a plan's outputs are to ONNX Runtime float: metrics, reference outputs, early stopping, the cross-check."""
