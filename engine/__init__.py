"""The only code that knows ranks, devices and DeepSpeed. Imports flow down, never up:

    train      the Trainer, its settings, the contrastive step, optimizer, validation, throughput
    tools      zero-shot classification, the HTML gallery, ONNX export
    loader     what the trainer reads: sources, sampling, read-ahead, batches made ready for the device
    run        a run on disk: run directory, log, checkpoints, resume, export
    retrieval  exact top-k over feature files (CPU tiles + C scan, GPU blocks, ranks split the images)
    inference  a trained model ready to use, feature extraction on all ranks, feature files
    scoring    recall, the MUGE evaluator, both directions, prediction files
    dist.py    every collective of the project (the one owner), timeouts, the watchdog

Each subpackage's docstring says what it may import; tests/unit/test_architecture.py checks it.
"""
