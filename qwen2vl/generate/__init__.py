"""Generation: token choice (sampling.py), stop strings on streamed text (stopping.py) and the KV-cached decode
loop (decode.py) that the pipeline, CLI and engine share."""
