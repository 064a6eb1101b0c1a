"""Developer tools: the instantiation table and the static kernel report."""
