"""`prefixflow analyze`: a batch file's prefix structure, read before running it."""
