"""Built data sets: sharded, pre-tokenized training sets for 100M+ pairs. layout.py says what a built
data set is on disk (format, manifest, settings, shard assignment), plan.py reads the queries into pair
arrays and tokenizes them, builder.py writes the shards and finalizes, reader.py reads it back
(memory-mapped pairs, one image LMDB per shard).

May import: data.images and data's ground floor (files, tokenizer, queries); nothing of engine or models.
"""
