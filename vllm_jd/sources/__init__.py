"""Where adapters come from: local folders, Hugging Face Hub ids and fsspec URLs.

``spec`` parses a source string (pure), ``hub`` and ``remote`` fetch one into a local folder,
``fetch`` runs many in parallel with one progress bar. Imports nothing of ours but ``store``.
"""
