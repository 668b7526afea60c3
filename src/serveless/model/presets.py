"""The paper's settings, in one place: its AlexNet stages and its memory sizes.

Kim & Lee cut AlexNet into four stages (conv1 | conv2 | conv3-5 | classifier) and ran them
at memMax (3008 MB, Lambda's largest size in 2019) everywhere, then at the memMin each
stage needed when profiled at 1,000 images per record: 2048, 1280, 1024 and 768 MB.
`--preset paper`, the demo, the planner's reference plans and the experiments all use
these.
"""

from __future__ import annotations

PAPER_PRESET: dict[str, list[str]] = {"alexnet": ["pool1", "pool2", "pool5"]}
"""The paper's four AlexNet stages: conv1 block | conv2 block | conv3-5 block | classifier."""
DEMO_CUTS: dict[str, list[str]] = {**PAPER_PRESET, "digits": ["pool1"]}
"""The stages `serveless demo --model M` cuts each built-in model into."""
PAPER_MEM_MAX = 3008
"""The paper's memMax: Lambda's largest memory size in 2019, for every stage."""
PAPER_MEM_MIN: dict[str, list[int]] = {"alexnet": [2048, 1280, 1024, 768]}
"""The paper's memMin for its four AlexNet stages at 1000 images per record."""
