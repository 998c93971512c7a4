"""Deployment: ONNX export of the retrieval model (``deploy.onnx_export``)."""
