"""Shared utilities: one small module per topic (dist, checkpoint, logging, schedule, knn, ...)."""
