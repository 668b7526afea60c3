"""The data a job reads and writes, and their formats: records (TFRecord), the user's
inputs found by content and packed into records (sources), stage 0's image decoding
(images, jpeg), the intermediate tensors (tensors), the predictions (one row per image)
and their export as one table. The demo's synthetic photos (samples) live here too.

Both sides use these modules: the driver packs and checks records and reads predictions;
a function decodes records, reads and writes tensors and writes predictions.
"""
