"""Python the MedNIST classification bundle's configs and commands use; the configs reach it through
``_target_`` paths such as ``scripts.data.load_split``, importable once ``initialize`` put ``bundle_root`` on
``sys.path``."""
