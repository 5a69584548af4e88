"""Exact top-k over feature files: planning the blocks, the GPU's torch block search, the CPU's
cache-sized tiles searched by one lane thread per core with a compiled C scan (csrc/, built on first
use; numpy's selection where no compiler works), BLAS thread control, and ranks splitting the images.

May import: engine.dist, engine.inference (feature files), engine.scoring (prediction files), data.
"""
