"""onnx_ir helpers: queries on a graph, sub-model extraction, loading, preparing and saving models."""
