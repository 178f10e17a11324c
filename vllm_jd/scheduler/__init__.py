"""Cluster-aware scheduling: a pure admission policy (``policy``) and its vLLM glue."""
