"""Tools around a trained model: zero-shot classification from class names, a self-contained HTML
gallery of retrieval results, and ONNX export of the two encoders checked in onnxruntime.

May import: engine.dist, engine.inference, engine.retrieval, engine.scoring, models, data.
"""
