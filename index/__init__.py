"""Block keys, the prefix tree and the position-independent chunk index."""
