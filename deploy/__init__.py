"""Deployment helpers that are Python code (the Ray launcher); scripts and images live beside."""
