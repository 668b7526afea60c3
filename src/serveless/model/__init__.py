"""Models: loading and checking ONNX models, the built-ins, cutting them into stages,
reducing their precision, and keeping the stages in the store and on this machine.

Nothing here is imported by a function at run time except `sessions` (how a stage is
opened in onnxruntime, the same wherever it is served or timed).
"""
