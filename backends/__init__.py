"""kldsl's inference engines, one module each; none imports another.

Each module defines ``engine`` (a :class:`kldsl.infer.Engine`) and is registered in the
entry-point group ``kldsl.engines``.
"""
