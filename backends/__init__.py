"""Backend simulators for Tollgate's tests and benchmarks.

``http`` is a small fast HTTP/1.1 server (uvloop + httptools), ``textgen`` the
deterministic text / token / embedding generator, ``common`` the pieces the personalities
share, and each personality is a sibling module (``vllm``, ``tgi``, ``tei``,
``openai_media``) exposing ``add_arguments`` and ``app_from_args`` for
``python -m backends --kind KIND``. ``process.SimulatorProcess`` starts one as a
subprocess and waits for its ready line.
"""
