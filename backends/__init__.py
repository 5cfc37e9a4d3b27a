"""Backend simulators for Tollgate's tests and benchmarks.

``http`` is a small fast HTTP/1.1 server (uvloop + httptools), ``textgen`` the
deterministic text / token / embedding generator, and each personality is a sibling
module (``vllm`` today) exposing ``add_arguments`` and ``app_from_args`` for
``python -m backends --kind KIND``. ``process.SimulatorProcess`` starts one as a
subprocess and waits for its ready line.
"""
