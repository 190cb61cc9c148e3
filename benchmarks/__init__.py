"""Measured comparisons: `make bench` runs them and writes results/*.json and PNG plots."""
