"""Shared plumbing of the entry scripts (errors, argument types, quiet logs); no model code."""
