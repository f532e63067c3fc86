"""`lavcap evaluate` and the caption metrics."""
