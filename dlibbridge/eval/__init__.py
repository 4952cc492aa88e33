"""Evaluation: embedders and their cache, LFW-style pairs, verification metrics, reports, ``embed``."""
