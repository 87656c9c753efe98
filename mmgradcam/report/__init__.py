"""Figures and reports people look at."""
