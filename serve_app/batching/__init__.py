"""Request batching: which calls run together, and in what order. No torch."""
