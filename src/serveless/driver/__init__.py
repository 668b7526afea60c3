"""The driver: it lays a job out in the store and runs it.

`spec` is job.json and the rules of a resume; `prepare` validates a job and lays it out
(stage models, records); `scheduler` runs every record's chain of stages through a backend;
`log` writes and reads the invocation log; `resume` reads what a job already holds;
`progress` draws the run's bar; `jobs` lists, inspects, cleans and deletes the jobs of a
store. The driver speaks to functions only through runtime/protocol.py.
"""
