"""Using a trained model: loading it ready to use (weights, configs, tokenizer, context length, image
preprocessing), extracting image and text features on every rank, and the feature files they go to.

May import: engine.dist, models, data.
"""
