"""The object store: any fsspec URL, written atomically, read with counted requests.

`store.py` is the `Store` itself (atomic verified writes, request counts), `s3.py` the S3
requests it makes beside s3fs, `retry.py` which failures are retried and how, `check.py`
whether a store can be used and the wording of its errors, `bandwidth.py` how fast it is
from where one stands, `layout.py` every key and name rule of the store's layout, and
`credentials.py` which store options are secrets and how they reach a function without
travelling. The names most code needs are re-exported here.
"""

from .layout import MODELS_PREFIX, JobLayout, ModelLayout, validate_job_name
from .retry import TransientStoreError
from .store import DEFAULT_STORE, READ_BLOCK, Store, file_md5

__all__ = ["DEFAULT_STORE", "MODELS_PREFIX", "READ_BLOCK", "JobLayout", "ModelLayout", "Store",
           "TransientStoreError", "file_md5", "validate_job_name"]
