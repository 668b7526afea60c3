"""The code that runs inside a function: it serves one stage of one job on one record.

`handler.handle(event) -> metrics` is what every backend calls; `protocol` is all it shares
with the driver (the event, the metrics, the error kinds); `loader` keeps the stage's
session warm and its files cached; `inputs` and `outputs` stream the record or tensor in
and the tensor or predictions out; `memory` measures what a memory cap is held to. A
second kind of call, the calibration (`calibration`, `coldstart`), measures a model's
blocks inside a function instance for `serveless calibrate --backend`; `handle` hands it
over by its event's kind. Nothing
here imports the driver, the planner or the command line: a function's image (a Lambda
runtime) needs the store, the data formats and onnxruntime, nothing more.
"""
