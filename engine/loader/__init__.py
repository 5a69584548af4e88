"""What the trainer reads: the training and validation sources (a built data set, or a queries jsonl
with an image store), the sampler's epoch driving, background read-ahead, GPU JPEG decode, and each
micro-batch made ready for the device (moved there and normalised there).

May import: engine.dist, data.
"""
