"""Using a trained model: naming it the one way every tool does (naming.py: a file or --run DIR; source.py:
what is there, checked against the flags), loading it ready to use (weights, configs, tokenizer, context
length, image preprocessing), extracting image and text features on every rank, and the feature files
they go to.

May import: engine.dist, models, data.
"""
