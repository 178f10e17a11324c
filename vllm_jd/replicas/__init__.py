"""Replicas on Ray Serve that split the clusters between them (``vllm-jd serve-ray``)."""
