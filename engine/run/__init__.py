"""A run on disk: the run directory (who may write it, and when it appears), the log and TensorBoard
scalars, crash-safe checkpoints, resume (also on another world size, through universal checkpoints),
and the export of the trained model (model_fp32.pt with its record, a transformers folder).

May import: engine.dist, models, data.
"""
