"""The text grammar of kldsl (``kldsl.lark``), shipped as package data."""
