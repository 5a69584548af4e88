"""Training: the run's settings (flags + DeepSpeed JSON, validated before any work), the Trainer (data,
model, DeepSpeed engine, the step loop), the contrastive step (exact or plain accumulation over
micro-batches), the optimizer and schedule, validation during training, throughput/FLOPs/MFU and
intra-op threads, and DeepSpeed's JIT-built ops (built per checkout, announced before a build).

May import: engine.dist, engine.run, engine.loader, engine.inference, engine.retrieval, engine.scoring,
models, data.
"""
