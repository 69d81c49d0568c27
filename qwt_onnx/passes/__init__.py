"""Graph passes (onnx_ir PassBase): Q/DQ insertion, the compensation splice, BatchNorm and bias folds."""
