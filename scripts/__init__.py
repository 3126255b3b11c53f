"""Helpers referenced by the MedNIST classification bundle's configs (``$import scripts``)."""

from scripts import checks, data, evaluate, export, handlers, infer, pipeline  # noqa: F401
