"""Adapters that drop the NeCo loss into other frameworks' pipelines (they import the core)."""
