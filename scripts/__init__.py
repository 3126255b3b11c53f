"""Helpers referenced by the MedNIST classification bundle's configs (``$import scripts``)."""

from scripts import checks, data, evaluate, handlers, infer, pipeline  # noqa: F401
