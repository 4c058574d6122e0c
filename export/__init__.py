"""ONNX export, Hub repository folders and publishing (``carlzoo.export``)."""
