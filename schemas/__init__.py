"""The recipe JSON Schema, installed as package data (``prunerecipe.schemas``)."""
